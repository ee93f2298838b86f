"""vae/core/optim.py: the optimizer's learning rate is changed in place, as a captured CUDA graph needs. (RAdam's
training and bit-exact resume: tests/test_trainer.py; both optimizers under compile and CUDA graphs:
tests/project/test_gpu.py.)"""
import torch

from vae.core.optim import set_lr_


def test_set_lr_writes_a_tensor_learning_rate_in_place():
    # A captured CUDA graph reads the learning-rate tensor it was captured with: it must be changed in place. A float
    # (or a tensor on another device, as loaded from a GPU checkpoint into a CPU run) is replaced by value.
    model = torch.nn.Linear(2, 2)
    lr = torch.tensor(0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    set_lr_(optimizer, 0.5)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == 0.5
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    optimizer.param_groups[0]["lr"] = torch.tensor(0.1, device="meta")
    set_lr_(optimizer, 0.2)
    assert optimizer.param_groups[0]["lr"] == 0.2
