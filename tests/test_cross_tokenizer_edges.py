"""Cross-tokenizer edges (OPD's `cross_tokenizer`), each on a tiny stand-in pair and, where `setup.sh --models` installed
it, on the real SmolLM2 -> Qwen2.5 pair (151,936 tokens):
- text that spells a control token ("<|im_start|>") stays text for the teacher; only a control token the student
  sampled becomes the teacher's;
- a finished response's end is scored against the teacher's end of turn (from its chat template), not its EOS;
- the student's `chat_template:` override does not render the teacher's prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdistill.config import load_config
from opdistill.methods.opd import OPD
from opdistill.models import load_tokenizer
from opdistill.teachers.alignment import cross_tokenize, end_of_turn_id, special_ids


def _qwen():
    try:
        return load_tokenizer("qwen2.5-coder-0.5b-instruct")
    except Exception:  # noqa: BLE001 - not installed (setup.sh --models): the stand-in pair still runs
        return None


QWEN = _qwen()
PAIRS = ["tiny->smollm2"] + (["smollm2->qwen"] if QWEN is not None else [])


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    return {"tiny": load_tokenizer(str(tiny_model)), "smollm2": load_tokenizer("smollm2-135m-instruct"), "qwen": QWEN}


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("control", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
def test_written_control_tokens_stay_text_and_only_sampled_ones_map(tokenizers, pair, control):
    student, teacher = (tokenizers[name] for name in pair.split("->"))
    teacher_controls = special_ids(teacher)
    written = student(f"Say {control} now", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert not set(written) & set(special_ids(student)), "the student wrote characters, not its control token"
    a = cross_tokenize(student, teacher, written, finished=False)
    assert not set(a.teacher_ids) & set(teacher_controls), teacher.convert_ids_to_tokens(a.teacher_ids)
    assert a.text == f"Say {control} now"
    sampled_id = student.convert_tokens_to_ids(control)
    if sampled_id in special_ids(student) and control in teacher_controls.values():
        b = cross_tokenize(student, teacher, written[:1] + [sampled_id] + written[-1:], finished=False)
        assert teacher.convert_tokens_to_ids(control) in b.teacher_ids, "a sampled control token is the teacher's control token"


def _eos_differs_from_end_of_turn(tmp_path: Path) -> Path:
    """SmolLM2's tokenizer with its EOS set to <|endoftext|> while its template still ends turns with <|im_end|>, as a
    base model's tokenizer under an instruct template has it."""
    from transformers import LlamaConfig

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(tmp_path / "teacher")
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(tmp_path / "teacher")  # a model directory; no weights are loaded
    return tmp_path / "teacher"


def test_the_end_is_scored_against_the_teachers_end_of_turn(tiny_model, tmp_path):
    teacher_dir = _eos_differs_from_end_of_turn(tmp_path)
    teacher = load_tokenizer(str(teacher_dir))
    im_end = teacher.convert_tokens_to_ids("<|im_end|>")
    assert teacher.eos_token_id != im_end and end_of_turn_id(teacher) == im_end
    assert end_of_turn_id(load_tokenizer("smollm2-135m-instruct")) == im_end
    if QWEN is not None:
        assert end_of_turn_id(QWEN) == QWEN.convert_tokens_to_ids("<|im_end|>")
    method = _opd(tiny_model, tmp_path, f"teacher={teacher_dir}")
    student = load_tokenizer(str(tiny_model))
    response = student("Hello there", add_special_tokens=False)["input_ids"] + [student.eos_token_id]
    assert method.align("", response, True).teacher_ids[-1] == im_end


def test_the_students_chat_template_override_does_not_render_the_teacher(tiny_model, tmp_path):
    override = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    teacher = load_tokenizer("smollm2-135m-instruct")
    method = _opd(tiny_model, tmp_path, "teacher=smollm2-135m-instruct", f"chat_template={json.dumps(override)}")
    assert method.teacher_tokenizers[""].chat_template == teacher.chat_template
    rendered = teacher.decode(method.teacher_prompts[0])
    assert "<|im_start|>user" in rendered and "[user]" not in rendered
    assert "[user]" in load_tokenizer(str(tiny_model), chat_template=override).decode(method.student_prompts[0])


def _opd(tiny_model: Path, tmp_path: Path, *extra: str) -> OPD:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Tell me about the sea."}) + "\n", encoding="utf-8")
    config = load_config(None, ["method=opd", f"student={tiny_model}", f"data={data}", f"out_dir={tmp_path / 'out'}", "cross_tokenizer=true",
                                "batch_size=1", "micro_batch_size=1", *extra])
    return OPD(config, load_tokenizer(str(tiny_model), chat_template=config.chat_template))
