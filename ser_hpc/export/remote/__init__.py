"""The model code of an exported Hugging Face folder (copied verbatim into it by
ser_hpc/export/hf.py). Nothing here may import ser_hpc: users of the folder do not have it."""
