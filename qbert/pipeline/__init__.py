"""The pipeline stages: fine-tune, calibrate, quantize, evaluate, export."""
