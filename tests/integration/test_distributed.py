"""Global-batch ITC and hard negatives over real gloo processes equal one process on the whole batch."""
import torch
import torch.distributed as dist
from helpers import forward, run_ranks, tiny_batch, tiny_model_config

import albef_ds
from albef_ds import distributed

GLOBAL_BATCH = 8
SEED = 11


def fresh_model():
    torch.manual_seed(0)
    return albef_ds.build_model(tiny_model_config(**{"model.queue_size": 64}))


def losses_and_grads(model, images, ids, mask, average_over_ranks: bool):
    """Each loss term and the gradients it gives, with the same per-step generator."""
    results = {}
    for term in ("loss_itc", "loss_itm", "loss_mlm"):
        model.zero_grad()
        out = forward(model, images, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(SEED))
        out[term].backward()
        grads = {}
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach().clone()
            if average_over_ranks:
                dist.all_reduce(g)
                g /= dist.get_world_size()
            grads[name] = g
        loss = out[term].detach().clone()
        if average_over_ranks:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        results[term] = (loss, grads)
    return results, model.image_queue.clone(), int(model.queue_ptr)


def rank_fn(rank, world):
    model = fresh_model()
    images, ids, mask = tiny_batch(model.cfg, GLOBAL_BATCH)
    b = GLOBAL_BATCH // world
    part = slice(rank * b, (rank + 1) * b)
    return losses_and_grads(model, images[part], ids[part], mask[part], True)


def test_itc_itm_and_mlm_over_two_ranks_equal_one_process():
    model = fresh_model()
    images, ids, mask = tiny_batch(model.cfg, GLOBAL_BATCH)
    reference, ref_queue, ref_ptr = losses_and_grads(model, images, ids, mask, False)
    ranks = run_ranks(rank_fn, 2)
    for results, queue, ptr in ranks:
        for term in ("loss_itc", "loss_itm", "loss_mlm"):
            loss, grads = results[term]
            ref_loss, ref_grads = reference[term]
            assert abs(loss.item() - ref_loss.item()) <= 1e-5, term
            assert grads.keys() == ref_grads.keys()
            for name in grads:
                assert torch.allclose(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4), (term, name)
        # the queues took the gathered global batch and stay identical to one process's
        assert ptr == ref_ptr and torch.allclose(queue, ref_queue, atol=1e-6)


def fetch_fn(rank, world, local_batch):
    torch.manual_seed(rank)
    x = torch.randn(local_batch, 5, 3, requires_grad=True)
    requests = torch.tensor([(rank * local_batch + 1 + i) % (world * local_batch) for i in range(local_batch)])
    distributed.traffic["fetch_bytes"] = 0
    (rows,) = distributed.fetch_rows(requests, x)
    weights = torch.arange(1.0, local_batch + 1)[:, None, None] * (rank + 1)
    (rows * weights).sum().backward()
    everyone_x = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone_x, x.detach())
    return {"x": x.detach(), "rows": rows.detach(), "requests": requests, "grad": x.grad,
            "all_x": torch.cat(everyone_x), "bytes": distributed.traffic["fetch_bytes"]}


def test_fetch_rows_routes_rows_and_returns_gradients_to_their_owner():
    world, b = 2, 3
    out = run_ranks(fetch_fn, world, b)
    all_x = out[0]["all_x"]
    expected_grad = torch.zeros_like(all_x)
    for rank, r in enumerate(out):
        assert torch.equal(r["rows"], all_x[r["requests"]])
        for i, g in enumerate(r["requests"].tolist()):
            expected_grad[g] += (i + 1) * (rank + 1)
    # rank 0's last request is row 0 of rank 1 (global row 3): its gradient arrives on rank 1
    assert out[0]["requests"][-1].item() == 3
    for rank, r in enumerate(out):
        assert torch.equal(r["grad"], expected_grad[rank * b:(rank + 1) * b])


def test_hard_negative_traffic_does_not_grow_with_world_size():
    two = run_ranks(fetch_fn, 2, 4)
    four = run_ranks(fetch_fn, 4, 4)
    per_rank = {r["bytes"] for r in two + four}
    assert len(per_rank) == 1, per_rank
    # an all-gather of the rows would receive (world - 1) * b rows: already more at 4 ranks
    row_bytes = 5 * 3 * 4
    assert per_rank.pop() < 3 * 4 * row_bytes
