"""The shim's optional CUDA side: it imports the core, the core never imports it at module level.

cuda.py: the one cuda-python import and its error checks. upload.py: the pinned-ring weight upload (packing.py: where
its bytes go; stats.py: the benchmarks' timings). The GPU decoder, used when nvCOMP is installed: planner.py (pure
planning), nvcomp.py (the ctypes binding), kernel.py (the byte-plane PTX kernel), device_decode.py (DeviceDecoder).
"""
