"""The repacked int weight's tiles, which the memory plan and the bind read without Triton: a weight is packed in
blocks of ROWS output rows by KT input features (one block, k-tile pair is ROWS * KT * bits / 32 contiguous int32
words), so the int kernels take a weight only where KT divides its rows and its groups."""

ROWS = 16  # output rows per packed block; one (block, k-tile) pair is ROWS * P contiguous int32 words
KT = 128  # input features per k-tile; P = KT * bits / 32 words per row (16 for int4, 32 for int8)
