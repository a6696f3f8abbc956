"""Calibration: text -> windows -> captured K/V shards -> the LightningModule that fits a compressor and validates
its perplexity, with the distillation objective, the FSDP strategy and the perplexity metric."""
