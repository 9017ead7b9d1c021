"""The pieces behind `klconvert quantize`: output plans per module, the resumable output folder, provenance, card."""
