"""The math and the networks: Gumbel noise and samples (`gumbel`), the negative ELBO (`loss`), the temperature
schedule (`schedule`), the evaluation metrics (`metrics`), the `model=` group (`model`) and the `optimizer=` group
(`optim`). Nothing here reads a file, a config or a device setting."""
