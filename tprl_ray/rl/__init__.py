"""PPO with RLlib: the codes pass, the pruning vector env, the RLModule and the training driver."""
