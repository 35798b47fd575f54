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
    (rows,) = distributed.fetch_rows(requests, x)
    weights = torch.arange(1.0, local_batch + 1)[:, None, None] * (rank + 1)
    (rows * weights).sum().backward()
    everyone_x = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(everyone_x, x.detach())
    return {"x": x.detach(), "rows": rows.detach(), "requests": requests, "grad": x.grad,
            "all_x": torch.cat(everyone_x)}


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


def measured_step_fn(rank, world, local_batch):
    """One training forward and backward of the tiny model on this rank's `local_batch` rows, with
    torch.distributed's collectives wrapped to record each call as it happens: the phase (forward,
    backward), the op (all_to_all_single's calls without split sizes, the request counts, apart),
    the dtype, the bytes that arrive in this rank's output buffers (its own part included, as
    docs/design.md counts) and the part of them that came from other ranks, and the bytes this rank
    hands in. Also albef_ds.distributed.traffic's counter, which the benchmark reports."""
    calls, phase = [], ["forward"]
    real = {name: getattr(dist, name) for name in ("all_to_all_single", "all_gather", "all_reduce")}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        row = output[0].numel() * output.element_size() if output.dim() > 1 else output.element_size()
        own = output_split_sizes[rank] * row if output_split_sizes is not None else output.numel() // world * row
        op = "all_to_all_single" if output_split_sizes is not None else "all_to_all_single (counts)"
        calls.append((phase[0], op, output.dtype, output.numel() * output.element_size(), own,
                      input.numel() * input.element_size()))
        return real["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    def all_gather(tensor_list, tensor, *args, **kwargs):
        size = tensor.numel() * tensor.element_size()
        calls.append((phase[0], "all_gather", tensor.dtype, sum(t.numel() * t.element_size() for t in tensor_list),
                      size, size))
        return real["all_gather"](tensor_list, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        size = tensor.numel() * tensor.element_size()
        calls.append((phase[0], "all_reduce", tensor.dtype, size, 0, size))
        return real["all_reduce"](tensor, *args, **kwargs)

    model = fresh_model()
    images, ids, mask = tiny_batch(model.cfg, world * local_batch)
    part = slice(rank * local_batch, (rank + 1) * local_batch)
    distributed.traffic.update(fetch_bytes=0, gather_bytes=0)
    dist.all_to_all_single, dist.all_gather, dist.all_reduce = all_to_all_single, all_gather, all_reduce
    try:
        out = forward(model, images[part], ids[part], mask[part], alpha=0.4,
                      generator=torch.Generator().manual_seed(SEED))
        phase[0] = "backward"
        out["loss"].backward()
    finally:
        dist.all_to_all_single, dist.all_gather, dist.all_reduce = real.values()
    return {"calls": calls, "counter": dict(distributed.traffic), "text_tokens": ids.shape[1]}


def test_hard_negative_traffic_does_not_grow_with_world_size():
    """Bytes measured at the collectives in one training step (forward and backward), the same local
    batch b on 2 and 4 ranks. What a rank fetches (its negatives' rows and text mask) and what it
    sends back (their gradients) and asks for (row ids) are exactly docs/design.md's bytes on any
    number of ranks; what it receives of the others' requests and gradients are those of its own
    rows that they drew, which the draws decide: b rows on average, so the mean over ranks of the
    bytes received equals the formula exactly, at 2 and at 4 ranks. Only the request counts (world
    x 8 bytes per exchange) and the ITC all-gather (the table's first row) grow."""
    b = 4
    cfg = tiny_model_config()
    image_tokens = (cfg.vision.img_size // cfg.vision.patch_size) ** 2 + 1      # P + 1
    fp32, int64 = 4, 8
    mean_received = {}
    for world in (2, 4):
        received = []
        for rank, r in enumerate(run_ranks(measured_step_fn, world, b)):
            L = r["text_tokens"]
            image_rows, text_rows = b * image_tokens * cfg.vision.width * fp32, b * L * cfg.text.hidden * fp32
            exchanges = [(phase, dtype, got, sent) for phase, op, dtype, got, _, sent in r["calls"]
                         if op == "all_to_all_single"]
            # in order: image exchange (row ids, rows), text exchange (row ids, rows, mask); gradients back
            assert [(phase, dtype) for phase, dtype, _, _ in exchanges] == [
                ("forward", torch.int64), ("forward", torch.float32), ("forward", torch.int64),
                ("forward", torch.float32), ("forward", torch.int64), ("backward", torch.float32),
                ("backward", torch.float32)], r["calls"]
            (_, _, _, image_ids), (_, _, image_got, _), (_, _, _, text_ids), (_, _, text_got, _), \
                (_, _, mask_got, _), (_, _, _, grads_a), (_, _, _, grads_b) = exchanges
            assert (image_got, text_got, mask_got) == (image_rows, text_rows, b * L * int64)   # fetched
            assert (image_ids, text_ids) == (b * int64, b * int64)                              # asked for
            assert sorted((grads_a, grads_b)) == sorted((image_rows, text_rows))                # sent back
            counts = [got for _, op, _, got, _, _ in r["calls"] if op == "all_to_all_single (counts)"]
            assert counts == [world * int64] * 2                     # one count per rank, per exchange
            gathered = sum(got - own for _, op, _, got, own, _ in r["calls"] if op == "all_gather")
            assert gathered == 2 * (world - 1) * b * cfg.embed_dim * fp32      # momentum features of the others
            exchanged = sum(got for _, _, got, _ in exchanges)
            assert r["counter"]["fetch_bytes"] == exchanged          # the benchmark's counter: what arrived
            received.append(exchanged)
        mean_received[world] = sum(received) / world
        formula = 2 * (image_rows + text_rows) + b * L * int64 + 2 * b * int64     # forward + backward
        assert mean_received[world] == formula, (world, received, formula)
    assert mean_received[2] == mean_received[4]
