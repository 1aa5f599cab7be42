"""The INT8 methods, the default block size and the Hadamard rotation groups: plain Python, no torch.

:mod:`.int8` and :mod:`.rotation` re-export them with the math they describe; the command line reads them here so
that ``headroom convert --help`` shows its choices without importing torch (and this package's ``__init__`` loads
nothing heavy until a kernel name is asked for).
"""

METHODS = ("rowwise", "block", "tensorwise")  # scale per output row / per row per block of inputs / per tensor
DEFAULT_BLOCK_SIZE = 128

DEFAULT_ROTATION_GROUP = 256
COMFY_ROTATION_GROUPS = (16, 64, 256)  # powers of 4: what comfy-kitchen can build
ROTATION_GROUPS = (16, 32, 64, 128, 256)
