"""Fine-tuning (LoRA / full) on the official data format: data.py, model.py, trainer.py, cli_args.py."""
