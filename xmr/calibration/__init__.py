"""INT8: calibration sets from real splits, Q/DQ quantization, sensitivity fallback, accuracy report."""
