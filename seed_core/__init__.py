"""seed_core: the SEED image tokenizer and its LLM glue, as a plain PyTorch library.

Imports torch, transformers and peft only; never ray, mlflow or argparse (a test asserts it),
so the model code is usable from a notebook or another trainer.
"""
