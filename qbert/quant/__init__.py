"""The quantization core: quantizers, range estimators, sites, GOBO, packing, integer codes."""
