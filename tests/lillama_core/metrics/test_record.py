from lillama_core.metrics.record import EvalRecord, RunMetrics

# metrics.json of a speech run and of a healed text run, as pipeline wrote them before RunMetrics existed
OLD_SPEECH = {"model": "whisper", "status": "completed", "device": "cpu", "params_before": 100, "params_after": 80,
              "reduction": 0.2, "weight_bytes_before": 400, "weight_bytes_after": 320, "planned_reduction": 0.2,
              "tokens": 64, "compress_seconds": 1.5, "layers_done": 2, "unreached_experts": 0, "seconds": 3.0,
              "teacher_ppl": 1.5, "teacher_wer": 0.0, "student_ppl": 2.5, "student_wer": 0.25, "eval_clips": 8,
              "wer_reference": "teacher transcripts"}
OLD_TEXT = {"model": "tiny", "status": "stopped", "params_before": 10, "params_after": 9, "reduction": 0.1,
            "heal_steps": 3, "heal_kl_before": 0.5, "teacher_ppl": 30.0, "student_ppl": 40.0, "eval_seq_len": 256}


def test_old_metrics_json_reads_and_writes_back_the_same_keys():
    for old in (OLD_SPEECH, OLD_TEXT):
        metrics = RunMetrics.from_dict(old)
        assert metrics.to_dict() == old
    text = RunMetrics.from_dict(OLD_TEXT)
    assert text.student_ppl == 40.0 and text.student_wer is None and text.extra == {"heal_steps": 3,
                                                                                     "heal_kl_before": 0.5}


def test_evaluation_fills_teacher_and_student_fields():
    metrics = RunMetrics(model="m")
    metrics.add_evaluation(EvalRecord(perplexity=2.0, wer=0.1, wer_reference="true transcripts", clips=4),
                           EvalRecord(perplexity=3.0, wer=0.2, wer_reference="true transcripts", clips=4))
    assert metrics.to_dict() == {"model": "m", "teacher_ppl": 2.0, "student_ppl": 3.0, "teacher_wer": 0.1,
                                 "student_wer": 0.2, "wer_reference": "true transcripts", "eval_clips": 4}
    text = RunMetrics()
    text.add_evaluation(EvalRecord(perplexity=2.0), EvalRecord(perplexity=3.0))
    assert text.to_dict() == {"teacher_ppl": 2.0, "student_ppl": 3.0}


def test_eval_record_round_trip_keeps_measured_fields_and_ignores_unknown_keys():
    record = EvalRecord(perplexity=5.0, nll=1.6, tokens_scored=10, parameters=7, accuracy={"piqa": 0.6})
    assert EvalRecord.from_dict({**record.to_dict(), "someday": 1}) == record
    assert set(record.to_dict()) == {"perplexity", "nll", "tokens_scored", "parameters", "accuracy"}
