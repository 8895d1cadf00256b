"""The engine's logits memo (netcarve/car/_memo.py): a network already evaluated on a chunk
is not run again -- whichever layer the call ablates -- and the statistics stay within the
engine's contract with the naive loop (relative 1e-5 on loss sums, decisions equal except at
counted near-ties)."""

from __future__ import annotations

import torch

from netcarve.car._memo import LogitsMemo, row_keys
from netcarve.car.engine import AblationEngine
from netcarve.car.greedy import greedy_prune
from netcarve.car.naive import ablate_naive, single_removals
from netcarve.car.stats import compare_stats
from netcarve.zoo import FASHION_MNIST_PRESET, ZOO

P = FASHION_MNIST_PRESET


def _data(n: int = 40, seed: int = 3) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = ZOO["fmnist_vgg"].factory().eval()
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    return net, x, y


def test_row_keys_name_the_network_not_the_call() -> None:
    keep = torch.ones(4, dtype=torch.bool)
    cut = keep.clone()
    cut[2] = False
    rows = torch.stack([keep, cut, cut])
    a = row_keys("a", rows, {"b": torch.ones(3, dtype=torch.bool)})
    assert a[0] == () and a[1] == a[2] and a[1] != a[0]
    # "a without filter 2" evaluated as the unablated network given a fixed
    assert row_keys("b", torch.ones(1, 3, dtype=torch.bool), {"a": cut}) == [a[1]]


def test_memo_stays_within_its_bound_and_drops_the_oldest() -> None:
    memo = LogitsMemo(3 * 40)  # three [10] float32 tensors
    for i in range(5):
        memo.put((("l", bytes([i])),), 0, torch.full((10,), float(i)))
    assert memo.get((("l", bytes([0])),), 0) is None
    assert memo.get((("l", bytes([1])),), 0) is None
    assert float(memo.get((("l", bytes([4])),), 0)[0]) == 4.0
    assert sum(v.numel() * 4 for v in memo._store.values()) <= 120
    LogitsMemo(0).put((), 0, torch.ones(2))  # a zero bound keeps nothing, silently


def test_a_repeated_call_reuses_every_item_and_gives_the_same_statistics() -> None:
    net, x, y = _data()
    engine = AblationEngine(net, x, y, preset=P, batch_size=10)
    cand = single_removals(64)[::8]
    first = engine.evaluate("features.4", cand)
    again = engine.evaluate("features.4", cand)
    assert again.counts.suffix_items == 0 and again.counts.prefix_passes == 0
    assert again.counts.reused_items == (len(cand) + 1) * len(y)
    assert torch.equal(again.loss_sum, first.loss_sum)
    assert torch.equal(again.correct, first.correct)


def test_greedy_next_base_is_the_last_choice_and_agrees_with_naive() -> None:
    """After removing filter f, the unablated network of the next call is f's candidate:
    its logits come from the memo, and the next step's CARs agree with the naive loop."""
    net, x, y = _data()
    engine = AblationEngine(net, x, y, preset=P, batch_size=10)
    layer = "features.7"
    step1 = engine.evaluate(layer, single_removals(64, [5, 9, 40]))
    own = torch.ones(64, dtype=torch.bool)
    own[9] = False
    cand = single_removals(64, [5, 40, 63], own)
    step2 = engine.evaluate(layer, cand, {layer: own})
    assert step2.counts.reused_items >= len(y)  # the base, from step 1's row for filter 9
    assert float(step2.base_loss_sum) == float(step1.loss_sum[1])
    want = ablate_naive(net, layer, cand, x, y, fixed={layer: own}, preset=P, batch_size=10)
    agreement = compare_stats(step2, want)
    assert agreement.ok, agreement.describe()


def test_equal_rows_of_one_call_run_once_even_without_a_memo() -> None:
    net, x, y = _data(20)
    engine = AblationEngine(net, x, y, preset=P, batch_size=10, memo_mb=0)
    one = single_removals(32, [3])
    cand = torch.cat([one, one, torch.ones(1, 32, dtype=torch.bool), one])
    stats = engine.evaluate("features.0", cand)
    assert stats.counts.reused_items == 3 * len(y)  # the two repeats and the unablated row
    assert torch.equal(stats.loss_sum[0], stats.loss_sum[3])
    assert float(stats.loss_sum[2]) == float(stats.base_loss_sum)
    want = ablate_naive(net, "features.0", cand, x, y, preset=P, batch_size=10)
    agreement = compare_stats(stats, want)
    assert agreement.ok, agreement.describe()


def test_greedy_with_and_without_the_memo_choose_the_same_filters() -> None:
    net, x, y = _data(60)
    orders = []
    for memo_mb in (64.0, 0.0):
        engine = AblationEngine(net, x, y, preset=P, batch_size=20, memo_mb=memo_mb)
        res = greedy_prune(net, x, y, ["features.0", "features.11"], amount=3, mode="exact",
                           preset=P, engine=engine)
        orders.append(res.order)
        accs = [s.accuracy for s in res.steps]
        assert len(accs) == 6
    assert orders[0] == orders[1]
