"""Evaluation tasks: CORE-style likelihood tasks, generative GSM8K with a calculator tool, the toy
problems, and how each is scored."""
