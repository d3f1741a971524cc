"""Training: the loop and its named parts (checkpoints, optimizers, logging and sampling), the recipe contract, the
recipe registry, and the checks a config's files and folders pass before a run starts."""
