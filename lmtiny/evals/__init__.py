"""Evaluations: bits per byte, CORE-style likelihood tasks, generative GSM8K with a calculator tool."""
