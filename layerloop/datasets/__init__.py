"""Sources, shard writer/reader, training stream loaders, the demo scene generator.

Lives inside the package on purpose: a top-level ``datasets/`` would shadow Hugging Face ``datasets``.
"""
