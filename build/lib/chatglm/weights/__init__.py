"""Model files: strict checkpoint loading, the safetensors reader, fp16 -> int4 conversion, download."""
