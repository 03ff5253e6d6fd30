"""Host syncs per training step, counted on the CPU (benchmarks/host_syncs.py): every one of them
stalls a GPU's queue, so a new one in the routed path must be a decision, not an accident."""
import torch
import torch.distributed as dist

from benchmarks.host_syncs import CONFIGS, HostSyncCounter, training_step_syncs


def test_counter_sees_each_kind_of_sync():
    x = torch.randn(6)
    m = x > 0
    with HostSyncCounter() as sc:
        x.sum().item()                       # read
        bool(m.any())                        # read
        x[m]                                 # shape (boolean index)
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))   # upload + shape
        x.tolist()                           # host
        torch.zeros(6).index_put_((m,), torch.tensor(1.0))           # upload + shape
        x.index_select(0, torch.arange(3))   # no sync
    assert sc.by_kind() == {"read": 2, "shape": 3, "upload": 2, "host": 1}


def test_counter_sees_the_backward():
    x = torch.randn(6, requires_grad=True)
    m = x.detach() > 0
    with HostSyncCounter() as sc:
        x[m].sum().backward()   # the forward finds the rows, and its backward finds them again
    assert sc.by_kind() == {"shape": 2}


def test_ec_static_training_step_has_no_sync_in_its_moe_layers():
    """forward_loss + backward of a 2-layer EC static model. The two syncs outside the layers are
    the masked positions found once for the output head and once for the loss (their number
    depends on the draw); none is in model/moe/."""
    sc = training_step_syncs(CONFIGS["ec_static"]())
    assert sc.count("model/moe/") == 0, sc.by_site()
    assert sc.total == 2, sc.by_site()
    assert sc.count("model/transformer.py", {"shape"}) == 1 and sc.count("model/diffusion.py", {"shape"}) == 1


def test_ec_dynamic_reads_its_sizes_once_per_step():
    """linear_reverse capacity: the model reads the capacities (max and sum, one transfer) once
    for all its MoE layers, which share the schedule, before the first block."""
    cfg = CONFIGS["ec_linear_reverse"]()
    assert cfg.model.n_layers > 1
    sc = training_step_syncs(cfg)
    assert sc.count("model/moe/") == 1 and sc.count("model/moe/routing.py", {"host"}) == 1, sc.by_site()
    assert sc.total == 3, sc.by_site()


def test_token_choice_with_capacity_and_dropless_routing_have_no_sync():
    """Without padding, TC's routing has fixed shapes (dropless: T*k rows; cf: E*C slots plus a
    dump slot) and the grouped matmul takes its offsets on the device. Where the CPU build has no
    grouped matmul, the per-expert loop reads the counts back once per layer."""
    from model.moe.experts import grouped_mm_supported
    for name in ("tc_cf1", "tc_dropless"):
        cfg = CONFIGS[name]()
        sc = training_step_syncs(cfg)
        loop = name == "tc_dropless" and not grouped_mm_supported(torch.zeros(1))
        assert sc.count("model/moe/") == (cfg.model.n_layers if loop else 0), (name, sc.by_site())


def test_expert_parallel_path_reads_each_split_size_once():
    """Through AllToAllDispatcher (a one-rank gloo group runs the same code as ep ranks): EC static
    and TC with capacity know every split from shapes; TC dropless reads its send and receive
    sizes in one transfer; EC linear_reverse reads its capacities and then every rank's."""
    from benchmarks.host_syncs import expert_parallel_layer_syncs
    from model import ModelConfig, from_dict
    from model.moe.layer import MoELayer
    expected = {"ec_static": ({"router": "expert_choice"}, 0),
                "ec_linear_reverse": ({"router": "expert_choice",
                                       "capacity": {"schedule": "linear_reverse", "k_min": 2, "k_max": 6}}, 2),
                "tc_cf1": ({"router": "token_choice", "capacity_factor": 1.0}, 0),
                "tc_dropless": ({"router": "token_choice"}, 1)}
    x, r = torch.randn(2, 16, 32), torch.rand(2)
    started_here = not dist.is_initialized()
    try:
        for name, (moe, n) in expected.items():
            cfg = from_dict(ModelConfig, {"moe": {"num_experts": 8, "expert_hidden": 16, "k": 4, **moe}}).moe
            sc = expert_parallel_layer_syncs(MoELayer(32, cfg), x, r)
            assert sc.count("model/moe/") == n, (name, sc.by_site())
    finally:   # leave no process group behind for the tests after this one
        if started_here and dist.is_initialized():
            dist.destroy_process_group()


def test_sync_free_ec_static_step_with_optimizer_has_no_host_sync():
    """diffusion.sync_free: the whole EC static training step (forward, loss, backward, the
    trainer's fused AdamW step) leaves the device queue alone. Without the option, the masked
    positions are found twice (head and loss); the optimizer step adds none."""
    sc = training_step_syncs(CONFIGS["ec_static_sync_free"](), optimizer=True)
    assert sc.total == 0, sc.by_site()
    sc = training_step_syncs(CONFIGS["ec_static"](), optimizer=True)
    assert sc.total == 2 and sc.count("model/moe/") == 0, sc.by_site()
