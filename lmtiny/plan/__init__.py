"""Planning a model before training it: parameter and FLOP counts, memory per chip, architecture search."""
