"""The official int4 weight format (``int4``), the int4 linear layer (``linear``), the choice of how it
computes (``dispatch``) and the kernels behind it (``kernels``). ``int4`` is the leaf: the kernels
import it, nothing here imports back."""
