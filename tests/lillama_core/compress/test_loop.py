import threading

import pytest
import torch
import transformers as T
from tiny import overflowing_float16_llama, tiny_llama, tiny_sequences, tiny_tokenizer

from lillama_core.compress.capture import LinearCovariances, unreached_experts
from lillama_core.compress.checkpoints import LayerCheckpoints
from lillama_core.compress.loop import Activations, Compressor, split_calibration
from lillama_core.compress.timing import PHASES
from lillama_core.config import DistillConfig, PlanConfig
from lillama_core.data.calibration import CalibrationData
from lillama_core.errors import NonFiniteError, RankPlanError
from lillama_core.events import RunFinished, Step, event_from_dict
from lillama_core.factorize.svd import OutputCovariance
from lillama_core.modeling.discovery import share_weights_copy
from lillama_core.modeling.loading import LoadedModel
from lillama_core.modeling.shipped import LowRankLinear, unfuse_experts
from lillama_core.planning.planner import make_plan
from lillama_core.planning.ranks import ModelShape, RankPlan, build_plan


def _calibration(n=24, seq=32):
    return CalibrationData(tiny_sequences(n, seq), "random", 0)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_run_emits_events_and_leaves_the_teacher_untouched(tiny):
    ids = tiny_sequences(2, 16, seed=5)
    before = _logits(tiny.model, ids)
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="bottom", reduction=0.1))
    events = []
    result = Compressor(tiny, _calibration(), plan, DistillConfig(), batch_size=8, on_event=events.append).run()
    torch.testing.assert_close(_logits(tiny.model, ids), before)
    assert result.status == "completed"
    assert result.applied.ranks == plan.ranks
    kinds = [e.kind for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    steps = [e for e in events if isinstance(e, Step)]
    assert steps and steps[-1].global_step == events[0].steps_total
    assert all(s.tokens_per_s >= 0 and s.eta_s >= 0 for s in steps[1:])
    # every event survives a JSON round trip, as the run log needs
    assert [event_from_dict(e.to_dict()) for e in events] == events


def test_student_has_low_rank_modules_only_where_planned(tiny):
    plan = RankPlan({"model.layers.1.mlp.up_proj": 8, "model.layers.1.self_attn.o_proj": 4})
    result = Compressor(tiny, _calibration(), plan, DistillConfig(), batch_size=8).run()
    low = {n: m.rank for n, m in result.student.named_modules() if isinstance(m, LowRankLinear)}
    assert low == plan.ranks
    assert not any(isinstance(m, LowRankLinear) for m in tiny.model.modules())


def test_bottom_first_never_runs_the_layers_above_the_last_compressed(tiny):
    calls = []
    tiny.model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="bottom", reduction=0.05, layer_keep=0.3))
    assert plan.layers(ModelShape.of(tiny.model)) == [0]
    result = Compressor(tiny, _calibration(), plan, DistillConfig(), batch_size=8).run()
    assert calls == []
    # the student's untouched layers share the teacher's tensors: no copy was made
    assert result.student.model.layers[2].mlp.up_proj.weight is tiny.model.model.layers[2].mlp.up_proj.weight


def test_stop_request_ends_the_run_within_one_step_and_keeps_finished_layers(tiny):
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        # stop during the second layer, at its second step
        if isinstance(event, Step) and event.layer == 1 and event.step == 2:
            stop.set()

    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="uniform", rank=8, reduction=None))
    result = Compressor(tiny, _calibration(48), plan, DistillConfig(), batch_size=4, on_event=on_event,
                        stop=stop).run()
    steps_after_stop = [e for e in events if isinstance(e, Step) and (e.layer > 1 or (e.layer == 1 and e.step > 2))]
    assert steps_after_stop == []
    assert result.status == "stopped"
    assert isinstance(events[-1], RunFinished) and events[-1].status == "stopped"
    assert events[-1].layers_done == [0]
    # layer 0 is compressed and usable, layer 1 went back to the dense teacher layer
    assert isinstance(result.student.model.layers[0].mlp.up_proj, LowRankLinear)
    assert not isinstance(result.student.model.layers[1].mlp.up_proj, LowRankLinear)
    assert set(result.applied.ranks) == {n for n in plan.ranks if ".layers.0." in n}
    assert torch.isfinite(_logits(result.student, tiny_sequences(1, 8))).all()


def test_plan_for_another_model_is_refused_before_any_work(tiny):
    plan = RankPlan({"model.layers.7.mlp.up_proj": 8})
    with pytest.raises(RankPlanError, match="does not have"):
        Compressor(tiny, _calibration(), plan, DistillConfig()).run()


def test_a_module_that_sees_no_token_gets_a_zero_covariance(tiny):
    # an MoE expert no calibration token is routed to: whitening must still get a matrix for it
    block = tiny.model.model.layers[0]
    covs = LinearCovariances(block, ["self_attn.q_proj", "mlp.down_proj"], torch.device("cpu"))
    x = torch.randn(10, block.self_attn.q_proj.in_features)
    block.self_attn.q_proj(x)
    covs.close()
    means = covs.means()
    torch.testing.assert_close(means["self_attn.q_proj"], (x.T @ x / 10).double())
    down = block.mlp.down_proj.out_features  # fewer outputs than inputs: whitened on its outputs
    assert isinstance(means["mlp.down_proj"], OutputCovariance)
    assert means["mlp.down_proj"].matrix.shape == (down, down) and not means["mlp.down_proj"].matrix.any()
    assert unreached_experts(means) == 1


def test_output_covariances_leave_out_the_bias_and_equal_w_c_w_t():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(16, 6), torch.nn.Linear(6, 16))
    covs = LinearCovariances(block, ["0", "1"], torch.device("cpu"))
    x = torch.randn(3, 10, 16)
    block(x)
    covs.close()
    means = covs.means()
    assert covs.on_outputs == {"0"} and not isinstance(means["1"], OutputCovariance)
    flat = x.reshape(-1, 16).double()
    weight = block[0].weight.double()
    torch.testing.assert_close(means["0"].matrix, weight @ (flat.T @ flat / 30) @ weight.T, rtol=1e-5, atol=1e-6)


def test_shared_input_covariances_are_computed_once_and_never_mixed_up(tiny):
    block = tiny.model.model.layers[0]
    names = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    covs = LinearCovariances(block, names, torch.device("cpu"))
    inputs = {}

    def keep_input(name):  # or the output (less bias) for the modules whitened on their outputs
        def hook(module, args, output):
            inputs.setdefault(name, (output if name in covs.on_outputs else args[0]).clone())
        return hook

    hooks = [block.get_submodule(n).register_forward_hook(keep_input(n)) for n in names]
    from lillama_core.compress.capture import capture_block_inputs
    from lillama_core.modeling.discovery import find_blocks
    data = CalibrationData(tiny_sequences(2, 16), "random", 0)
    starts, recorded = capture_block_inputs(tiny.model, find_blocks(tiny.model), data, [slice(0, 2)],
                                            torch.device("cpu"))
    block(starts[0], **recorded.kwargs_for(0)(slice(0, 2)))
    for h in hooks:
        h.remove()
    covs.close()
    acc = covs.accumulators
    assert acc["mlp.gate_proj"] is acc["mlp.up_proj"]
    assert acc["mlp.gate_proj"] is not acc["self_attn.q_proj"]
    # fewer outputs than inputs (grouped-query k, the down projection): whitened on their own outputs
    assert covs.on_outputs == {"self_attn.k_proj", "mlp.down_proj"}
    for name in names:
        x = inputs[name].reshape(-1, inputs[name].shape[-1]).double()
        torch.testing.assert_close(acc[name].mean(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_share_weights_copy_shares_tensors_but_not_modules(tiny):
    copy = share_weights_copy(tiny.model)
    assert copy.model.layers[0] is not tiny.model.model.layers[0]
    assert copy.model.layers[0].mlp.up_proj.weight is tiny.model.model.layers[0].mlp.up_proj.weight


def test_energy_plan_with_whitened_spectra_meets_the_target(tiny):
    plan = make_plan(tiny, PlanConfig(strategy="energy", reduction=0.15, whitened_energy=True), _calibration())
    shape = ModelShape.of(tiny.model)
    from lillama_core.planning.ranks import summarize
    assert summarize(plan, shape).reduction >= 0.15 - 1e-9


def test_models_with_different_layer_kwargs_still_match_the_full_forward():
    """Block-by-block replay with recorded kwargs must reproduce the model's own forward pass."""
    loaded = tiny_llama(layers=3)
    from lillama_core.compress.capture import capture_block_inputs, run_block_over
    from lillama_core.modeling.discovery import find_blocks
    seqs = tiny_sequences(4, 16)
    blocks = find_blocks(loaded.model)
    batches = [slice(0, 3), slice(3, 4)]
    starts, recorded = capture_block_inputs(loaded.model, blocks, CalibrationData(seqs, "random", 0), batches,
                                            torch.device("cpu"))
    hidden = starts[0]
    for block in blocks:
        run_block_over(block.module, hidden, hidden, recorded.kwargs_for(block.index), batches, torch.device("cpu"))
    with torch.no_grad():
        reference = loaded.model.model(input_ids=seqs).last_hidden_state
    torch.testing.assert_close(loaded.model.model.norm(hidden), reference, rtol=1e-4, atol=1e-5)


def test_other_threads_using_the_teacher_do_not_disturb_a_run(tiny):
    """The app chats with the teacher while a run captures inputs and gathers covariances."""
    block = tiny.model.model.layers[0]
    covs = LinearCovariances(block, ["mlp.up_proj"], torch.device("cpu"))
    other = threading.Thread(target=lambda: tiny.model(input_ids=tiny_sequences(1, 8)))
    other.start()
    other.join()
    assert covs.accumulators == {}  # the chat thread's activations were not counted
    covs.close()
    layers_before = list(tiny.model.model.layers)
    seen = []
    plan = RankPlan({"model.layers.1.mlp.up_proj": 8})
    Compressor(tiny, _calibration(), plan, DistillConfig(train=False),
               on_event=lambda e: seen.append(list(tiny.model.model.layers))).run()
    assert all(layers == layers_before for layers in seen)  # blocks were never swapped out


def test_out_of_memory_stops_cleanly_with_advice_and_the_next_run_works(tiny, monkeypatch):
    import lillama_core.compress.loop as engine
    from lillama_core.errors import OutOfMemoryError

    def boom(self, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    events = []
    plan = RankPlan({"model.layers.1.mlp.up_proj": 8})
    with monkeypatch.context() as patch:
        patch.setattr(engine.LayerDistiller, "train", boom)
        with pytest.raises(OutOfMemoryError, match="lower the batch size"):
            Compressor(tiny, _calibration(), plan, DistillConfig(), on_event=events.append).run()
    assert events[-1].kind == "run_error" and "out of memory" in events[-1].message
    assert Compressor(tiny, _calibration(), plan, DistillConfig()).run().status == "completed"


def test_non_finite_losses_skip_the_step_and_are_reported(tiny, monkeypatch):
    import lillama_core.compress.layer as distill

    real = distill.feature_loss
    calls = []

    def sometimes_nan(prediction, target):
        calls.append(1)
        loss = real(prediction, target)
        return loss * float("nan") if prediction.requires_grad and len(calls) % 5 == 0 else loss

    monkeypatch.setattr(distill, "feature_loss", sometimes_nan)
    events = []
    plan = RankPlan({"model.layers.1.mlp.up_proj": 8})
    result = Compressor(tiny, _calibration(48), plan, DistillConfig(), batch_size=4, on_event=events.append).run()
    skipped = [e for e in events if isinstance(e, Step) and e.skipped]
    finished = [e for e in events if e.kind == "layer_finished"]
    assert skipped and finished[0].skipped_steps == len(skipped)
    low = result.student.model.layers[1].mlp.up_proj
    assert torch.isfinite(low.A.weight).all() and torch.isfinite(low.B.weight).all()


def _mixtral_routing_only_to_experts_0_and_1():
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = T.MixtralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1)
    model = T.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # router logits (u.x, -u.x, 0, 0): top-1 never picks expert 2 or 3
        gate = model.model.layers[0].mlp.gate.weight
        gate[1] = -gate[0]
        gate[2:] = 0.0
    unfuse_experts(model)  # as load_model does
    return LoadedModel(model, tokenizer, "mixtral", "random", torch.device("cpu"), torch.float32)


def test_experts_no_token_reaches_are_counted_and_get_balanced_factors():
    loaded = _mixtral_routing_only_to_experts_0_and_1()
    plan = build_plan(ModelShape.of(loaded.model), PlanConfig(strategy="uniform", rank=8, reduction=None,
                                                              groups=["experts"]))
    events = []
    result = Compressor(loaded, _calibration(12), plan, DistillConfig(epochs=1), batch_size=4,
                        on_event=events.append).run()
    finished = [e for e in events if e.kind == "layer_finished"]
    assert [e.unreached_experts for e in finished] == [2]
    assert event_from_dict(finished[0].to_dict()).unreached_experts == 2
    layer = result.student.model.layers[0]
    for expert in (2, 3):
        for name in ("gate_up_proj", "down_proj"):
            low = layer.get_submodule(f"mlp.experts.{expert}.{name}")
            ratio = (low.A.weight.abs().max() / low.B.weight.abs().max()).item()
            assert 0.01 < ratio < 100, (expert, name, ratio)


def test_layer_reports_written_before_the_unreached_count_still_load():
    data = {"kind": "layer_finished", "layer": 0, "init_loss": 1.0, "best_loss": 0.5, "final_loss_teacher_input": 0.5,
            "final_loss_student_input": 0.5, "best_step": 3, "seconds": 1.0, "params_before": 10, "params_after": 5}
    assert event_from_dict(data).unreached_experts == 0
    assert event_from_dict(data).breakdown == {}  # logs from before the per-phase breakdown


def test_each_layer_reports_where_its_time_went(tiny, tmp_path):
    """A consistency check, not a timing one: the phases are known, non-negative, cover the work the layer
    did, and being disjoint parts of the layer's wall clock they add up to at most its seconds."""
    plan = build_plan(ModelShape.of(tiny.model), PlanConfig(strategy="bottom", reduction=0.1))
    result = Compressor(tiny, _calibration(), plan, DistillConfig(eval_every=2), batch_size=8,
                        checkpoints=LayerCheckpoints(tmp_path)).run()
    assert result.layers
    for layer in result.layers:
        assert set(layer.breakdown) == set(PHASES)  # whitened init, keep-best, checkpoints: every phase ran
        assert all(seconds >= 0 for seconds in layer.breakdown.values())
        total = sum(layer.breakdown.values())
        assert 0.5 * layer.seconds <= total <= layer.seconds * 1.0001 + 1e-6


@pytest.mark.parametrize("init", ["whitened", "svd"])
def test_float16_overflow_stops_the_run_at_the_layer_that_overflows(init):
    # Both inits used to end in a LinAlgError traceback from the SVD of inf/NaN.
    loaded = overflowing_float16_llama()
    plan = build_plan(ModelShape.of(loaded.model), PlanConfig(strategy="uniform", rank=8, reduction=None))
    events = []
    with pytest.raises(NonFiniteError, match=r"^layer 1 \(model\.layers\.1\) produced inf/NaN activations in "
                                             r"float16: run with --dtype bfloat16 or float32$"):
        Compressor(loaded, _calibration(12), plan, DistillConfig(init=init, epochs=1), batch_size=4,
                   on_event=events.append).run()
    assert [e.layer for e in events if e.kind == "layer_finished"] == [0]  # the layer below was finished first
    assert events[-1].kind == "run_error" and events[-1].error_type == "NonFiniteError"


def test_non_finite_weights_are_refused_before_factorising():
    # An expert no token reaches never shows its inf weight in an activation; its SVD would fail.
    loaded = _mixtral_routing_only_to_experts_0_and_1()
    with torch.no_grad():
        loaded.model.model.layers[0].get_submodule("mlp.experts.3.down_proj").weight[0, 0] = float("inf")
    plan = build_plan(ModelShape.of(loaded.model), PlanConfig(strategy="uniform", rank=8, reduction=None,
                                                              groups=["experts"]))
    with pytest.raises(NonFiniteError, match=r"^layer 0 \(model\.layers\.0\) module mlp\.experts\.3\.down_proj has "
                                             r"inf/NaN weights in float32"):
        Compressor(loaded, _calibration(12), plan, DistillConfig(epochs=1), batch_size=4).run()


# The pieces of a run, each alone: preparation, one layer's training, advancing the activations.

def _walk(tiny, plan, **distill):
    from lillama_core.modeling.discovery import find_blocks

    compressor = Compressor(tiny, _calibration(), plan, DistillConfig(**distill), batch_size=8)
    blocks = find_blocks(tiny.model)
    split = split_calibration(compressor.calibration, 8)
    ranks = compressor._ranks_by_layer(blocks)
    walk = compressor._prepare(blocks, ranks, sorted(ranks), split, len(split.train),
                               share_weights_copy(tiny.model))
    return compressor, walk


def test_split_keeps_the_last_sequences_for_held_out_checks():
    split = split_calibration(_calibration(n=24), 8)
    assert split.train == [slice(0, 8), slice(8, 16), slice(16, 23)] and split.held_out == [slice(23, 24)]
    assert split.batches == split.train + split.held_out and split.train_rows == [8, 8, 7]
    assert torch.equal(split.calibration.sequences, _calibration(n=24).sequences)


def test_split_gives_each_process_its_share_of_every_batch():
    from lillama_core.errors import ConfigError
    from lillama_core.runtime.distributed import Parallel

    calibration = _calibration(n=24)
    split = split_calibration(calibration, 8, Parallel(rank=1, world_size=2))
    assert split.train_rows == [8, 8, 7]  # loss weights count every process's rows
    assert [s.stop - s.start for s in split.batches] == [4, 4, 4, 1]
    torch.testing.assert_close(split.calibration.sequences[:4], calibration.sequences[4:8])
    with pytest.raises(ConfigError, match="share of every batch"):
        split_calibration(calibration, 1, Parallel(rank=0, world_size=2))


def test_advance_runs_the_student_path_only_once_it_differs(tiny):
    import copy

    compressor, walk = _walk(tiny, RankPlan({"model.layers.1.mlp.up_proj": 8}))
    first, second = walk.blocks[0], walk.blocks[1]
    acts = Activations(teacher=walk.starts[0])
    kwargs, _ = compressor._kwargs(first, acts, walk)
    teacher_y = compressor._teacher_outputs(first, acts.teacher, kwargs, walk)
    compressor._advance(acts, first, teacher_y, kwargs, walk)
    assert acts.teacher is teacher_y and acts.student is None  # nothing compressed below: one path
    teacher_z = compressor._teacher_outputs(second, acts.teacher, kwargs, walk)
    compressor._advance(acts, second, teacher_z, kwargs, walk, copy.deepcopy(second.module))
    assert acts.teacher is teacher_z and acts.student is not teacher_z
    torch.testing.assert_close(acts.student, teacher_z)  # an unchanged copy reproduces the teacher
    student = acts.student
    compressor._advance(acts, walk.blocks[2], teacher_z, kwargs, walk)
    assert acts.student is student  # the student path is advanced in place


def test_one_layer_is_trained_installed_and_advanced(tiny):
    compressor, walk = _walk(tiny, RankPlan({"model.layers.0.mlp.up_proj": 8}))
    acts = Activations(teacher=walk.starts[0])
    report = compressor._compress_layer(walk.blocks[0], {"mlp.up_proj": 8}, acts, walk)
    assert report.layer == 0 and report.best_loss <= report.init_loss
    assert walk.global_step == walk.steps_per_layer == walk.steps_total
    assert isinstance(walk.student.get_submodule("model.layers.0.mlp.up_proj"), LowRankLinear)
    assert acts.student is not None and not torch.equal(acts.student, acts.teacher)


def test_a_checkpoint_with_other_ranks_than_the_plan_is_refused(tiny, tmp_path):
    from lillama_core.compress.checkpoints import LayerCheckpoints

    plan = RankPlan({"model.layers.0.mlp.up_proj": 8})
    Compressor(tiny, _calibration(), plan, DistillConfig(), checkpoints=LayerCheckpoints(tmp_path)).run()
    compressor, walk = _walk(tiny, RankPlan({"model.layers.0.mlp.up_proj": 4}))
    compressor.checkpoints = LayerCheckpoints(tmp_path)
    with pytest.raises(RankPlanError, match="other ranks"):
        compressor._compress_layer(walk.blocks[0], {"mlp.up_proj": 4}, Activations(teacher=walk.starts[0]), walk)
