"""The official magcache_forward skip rule (kandinsky/magcache_utils.py), as a reference for the tests."""

import numpy as np


def official_rule(ratios, steps, cfg, threshold=0.12, K=2, retention=0.2):
    """The official magcache_forward decision loop, with its call counter: returns the skipped (step, branch)."""
    mag = [1.0, 1.0] + list(ratios)
    if len(mag) != 2 * steps:
        interp = [np.asarray(mag[b::2])[np.round(np.arange(steps) * ((len(mag[b::2]) - 1) / (steps - 1))).astype(int)]
                  for b in (0, 1)]  # fmt: skip
        mag = np.stack(interp, axis=1).reshape(-1).tolist()
    acc_ratio, acc_steps, acc_err = [1.0, 1.0], [0, 0], [0.0, 0.0]
    skipped, cnt = [], 0
    while cnt < 2 * steps:
        b = cnt % 2
        if cnt >= int(2 * steps * retention):
            acc_ratio[b] *= mag[cnt]
            acc_steps[b] += 1
            acc_err[b] += abs(1 - acc_ratio[b])
            if acc_err[b] < threshold and acc_steps[b] <= K:
                skipped.append((cnt // 2, b))
            else:
                acc_ratio[b], acc_steps[b], acc_err[b] = 1.0, 0, 0.0
        cnt += 1 if cfg else 2
    return skipped
