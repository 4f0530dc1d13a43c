"""The shim's CUDA side: cuda-python access (cuda.py), the pinned-ring weight upload (upload.py) and the optional nvCOMP decoder (decode.py)."""
