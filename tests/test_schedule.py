"""vae/core/schedule.py: the temperature schedule."""
import math

import pytest

from vae.core.schedule import temperature_at

SCHEDULE = dict(temperature=1.0, temp_min=0.5, anneal_rate=3e-5, anneal_interval=100)


def test_schedule_values_at_chosen_steps():
    assert temperature_at(0, **SCHEDULE) == 1.0
    assert temperature_at(99, **SCHEDULE) == 1.0                       # updated every 100 steps only
    assert temperature_at(100, **SCHEDULE) == pytest.approx(math.exp(-3e-5 * 100))
    assert temperature_at(6123, **SCHEDULE) == pytest.approx(math.exp(-3e-5 * 6100))
    assert temperature_at(30_000, **SCHEDULE) == pytest.approx(max(0.5, math.exp(-0.9)))


def test_schedule_floor_and_no_reset_across_epochs():
    assert temperature_at(10**7, **SCHEDULE) == 0.5
    # 600 steps per epoch: the first step of epoch 3 continues from epoch 2's last, it does not restart at 1.0
    taus = [temperature_at(s, **SCHEDULE) for s in range(0, 6000, 100)]
    assert all(a >= b for a, b in zip(taus, taus[1:])) and taus[-1] < taus[0]
    assert temperature_at(1200, **SCHEDULE) < temperature_at(599, **SCHEDULE)
    # the paper's form max(0.5, exp(-r t)) with r = 1e-4, N = 1000
    assert temperature_at(2500, temperature=1.0, temp_min=0.5, anneal_rate=1e-4, anneal_interval=1000) == \
        pytest.approx(math.exp(-1e-4 * 2000))


def test_lr_schedules():
    from vae.core.schedule import lr_at

    cosine = dict(lr=1e-3, schedule="cosine", total_steps=1000)
    assert lr_at(0, **cosine) == 1e-3
    assert lr_at(500, **cosine) == pytest.approx(5e-4)
    assert lr_at(250, **cosine) == pytest.approx(1e-3 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(1000, **cosine) == pytest.approx(0.0, abs=1e-18) and lr_at(5000, **cosine) == lr_at(1000, **cosine)
    lrs = [lr_at(s, **cosine) for s in range(0, 1001, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert {lr_at(s, lr=1e-3, schedule="constant", total_steps=1000) for s in (0, 500, 10**6)} == {1e-3}
    with pytest.raises(ValueError, match="linear"):
        lr_at(0, lr=1e-3, schedule="linear", total_steps=10)
