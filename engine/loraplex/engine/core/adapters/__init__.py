"""Adapters: PEFT checkpoint parsing, sources (local, Hub, S3), and the tiered cache."""
