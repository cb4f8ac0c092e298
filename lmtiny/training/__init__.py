"""Training: the jitted steps, the one run loop (pretraining, SFT, RL), optimizers, loss scaling, lowering."""
