"""The pipeline stages (finetune, calibrate, quantize, evaluate, export) and the run that orders them."""
