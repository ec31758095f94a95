"""Windows and CUDA, checked without either: the names and paths a run writes, POSIX-only calls in src/, features
that need Triton, an NVIDIA GPU that torch cannot use (the probe's answer injected), and the noise generator."""

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image

import app
from studio.errors import TorchWithoutCudaError
from studio.params import MAX_SEED
from studio.runs import DecomposeResult, RUN_PATH_MAX_CHARS, WINDOWS_MAX_PATH_CHARS, save_run, windows_path_warning
from studio.stack import LayerStack, save_sub_run

# Windows' rules for a file or folder name (Microsoft, "Naming Files, Paths, and Namespaces").
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in "123456789¹²³"), *(f"LPT{i}" for i in "123456789¹²³")}
WINDOWS_FORBIDDEN = set('<>:"/\\|?*') | {chr(c) for c in range(32)}


def windows_name_problem(name: str) -> str | None:
    if WINDOWS_FORBIDDEN & set(name):
        return f"{name!r} holds a character Windows forbids"
    if name.endswith((".", " ")):
        return f"{name!r} ends with a dot or a space"
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_RESERVED:
        return f"{name!r} is a name Windows reserves"
    if len(name.encode("utf-16-le")) // 2 > 255:
        return f"{name!r} is longer than 255 characters"
    return None


def test_the_name_checker_knows_windows_rules():
    bad = ["CON", "nul.zip", "Com1.png", "lpt9", "a.", "a ", "a:b", "a?b", "x" * 256]
    assert all(windows_name_problem(n) for n in bad)
    assert not any(windows_name_problem(n) for n in ["CON_seed7.zip", "layer_1.png", "console.png", "사과_seed1.psd"])


def solid_layers(count=2, size=(32, 24)):
    return [Image.new("RGBA", size, (40 * i, 90, 200, 255 if i else 128)) for i in range(count)]


# Captions a user (or the auto-caption) can give, each a trap for a Windows file name.
HOSTILE_CAPTIONS = ["CON", "nul", "com1.", "LPT1 ", "a. ", "   ", "...", "x" * 300, "사과" * 40,
                    'a<b>c:d"e/f\\g|h?i*j', "tab\there\nnewline", "e\u0301te\u0301.", "🍎"]


@pytest.mark.parametrize("caption", HOSTILE_CAPTIONS)
def test_every_file_a_run_and_a_sub_run_write_has_a_valid_windows_name_and_fits_the_path_budget(tmp_path, caption):
    layers = solid_layers()
    result = DecomposeResult(layers=layers, caption=caption, auto_caption=False, seed=MAX_SEED,
                                 params={"input_size": [48, 36]}, duration_s=0.0)
    paths = save_run(result, tmp_path, original_size=(48, 36))
    stack = LayerStack(layers=layers, run_folder=paths["folder"], files=paths, original_size=(48, 36))
    save_sub_run(stack, layers[:1] + solid_layers(2), 1, result)

    written = [p.relative_to(tmp_path) for p in tmp_path.rglob("*")]
    assert len([p for p in written if p.suffix == ".psd"]) == 4  # run + sub-run, each at both sizes
    problems = [windows_name_problem(part) for p in written for part in p.parts]
    assert [p for p in problems if p] == []
    # The longest path, with the longest size text an input can have (32000x2000 is 64 MP at 16:1) in place of 48x36.
    longest = max(len(str(p)) + (len("32000x2000") - len("48x36") if "48x36" in p.name else 0) for p in written)
    assert longest <= RUN_PATH_MAX_CHARS


def test_a_deep_outputs_folder_on_windows_gets_a_warning_with_the_fix():
    short, deep = Path("C:/Users/ana/qil/outputs"), Path("C:/Users/someone/Documents/GitHub/Qwen-Image-Layered-studio/outputs")

    assert windows_path_warning(deep, windows=False) is None  # Linux and macOS have no such limit
    assert windows_path_warning(short, windows=True) is None
    message = windows_path_warning(deep, windows=True)
    assert message and "--outputs" in message and "LongPathsEnabled" in message
    assert f"at most {WINDOWS_MAX_PATH_CHARS - 1 - RUN_PATH_MAX_CHARS} characters" in message


# ---- POSIX-only calls in src/ ------------------------------------------------------------------------
POSIX_ONLY_MODULES = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "crypt"}
POSIX_ONLY_ATTRIBUTES = {
    "os": {"fork", "forkpty", "getuid", "geteuid", "getgid", "getegid", "setsid", "killpg", "getpgid", "setpgrp",
           "sysconf", "statvfs", "uname", "mkfifo", "chown", "lchown", "getloadavg", "nice", "wait3", "wait4", "sync",
           "sched_getaffinity", "sched_setaffinity", "posix_fadvise", "WNOHANG"},
    "signal": {"SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGQUIT", "SIGCHLD", "SIGPIPE", "SIGSTOP",
               "SIGCONT", "alarm", "pause", "setitimer", "getitimer", "siginterrupt", "pthread_kill", "pthread_sigmask"},
}
GUARDS = ("os.name", "sys.platform", "platform.system", "hasattr(")


def unguarded_posix_calls(source: str, filename: str = "<src>") -> list[str]:
    """POSIX-only imports, calls and literal POSIX paths not under an `if` on the platform (or hasattr), nor in a
    `try` that catches ImportError / AttributeError."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def guarded(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.If, ast.IfExp)) and any(g in ast.unparse(node.test) for g in GUARDS):
                return True
            if isinstance(node, ast.Try) and any(
                    h.type is not None and any(n in ast.unparse(h.type) for n in ("ImportError", "AttributeError"))
                    for h in node.handlers):
                return True
        return False

    found = []
    for node in ast.walk(tree):
        what = None
        if isinstance(node, ast.Import):
            what = next((a.name for a in node.names if a.name.split(".")[0] in POSIX_ONLY_MODULES), None)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in POSIX_ONLY_MODULES:
            what = node.module
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.attr in POSIX_ONLY_ATTRIBUTES.get(node.value.id, ()):
            what = f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith(("/tmp/", "/dev/", "/proc/", "/var/", "/home/")):
            what = repr(node.value)
        if what and not guarded(node):
            found.append(f"{filename}:{node.lineno}: {what}")
    return found


def test_the_posix_check_finds_unguarded_calls_and_lets_guarded_ones_pass():
    assert len(unguarded_posix_calls("import fcntl\nimport os\nos.sysconf('SC_PAGE_SIZE')\nopen('/dev/shm/x')")) == 3
    assert unguarded_posix_calls("import os, signal\nif os.name != 'nt':\n    import fcntl\n    signal.signal(signal.SIGHUP, f)\n"
                                 "if hasattr(os, 'sysconf'):\n    os.sysconf('x')\ntry:\n    import resource\n"
                                 "except ImportError:\n    resource = None\nsignal.signal(signal.SIGTERM, f)\n") == []


def test_src_uses_no_posix_only_call_without_a_guard():
    files = sorted((ROOT / "src").rglob("*.py"))
    assert len(files) >= 3
    found = [hit for path in files for hit in unguarded_posix_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert found == []


# ---- Triton ------------------------------------------------------------------------------------------
def test_sage_attention_stays_off_without_triton(monkeypatch):
    """SageAttention's kernels are Triton kernels: with its package but without Triton it is not applied, and the
    log line says how to get Triton, on Windows too."""
    monkeypatch.setattr(app, "package_version", lambda package: "2.2.0" if package == "sageattention" else None)
    monkeypatch.setattr(app, "triton_available", lambda: False)
    assert "it needs Triton" in app.sage_attention_unavailable(True)
    assert "triton-windows" in app.sage_attention_unavailable(True)
    assert "CUDA GPU" in app.sage_attention_unavailable(False)
    monkeypatch.setattr(app, "triton_available", lambda: True)
    assert app.sage_attention_unavailable(True) is None


def test_triton_probe_answers_for_this_machine():
    import importlib.util

    assert app.triton_available() == (importlib.util.find_spec("triton") is not None)


# ---- an NVIDIA GPU that torch cannot use ---------------------------------------------------------------
def test_a_gpu_with_cpu_only_torch_gets_the_cuda_wheel_command():
    message = app.torch_without_cuda_message(driver_answers=True, cuda_available=False, torch_cuda=None)

    version = torch.__version__.split("+")[0]
    assert "built without CUDA" in message and "Windows is CPU-only" in message
    assert f"pip install torch=={version} torchvision --index-url https://download.pytorch.org/whl/cu130" in message
    assert "driver" in app.torch_without_cuda_message(True, False, "12.8")  # a CUDA build the driver cannot run
    assert app.torch_without_cuda_message(False, False, None) is None  # no NVIDIA GPU: the CPU is all there is
    assert app.torch_without_cuda_message(True, True, "12.8") is None  # torch uses the GPU


def test_the_real_model_is_refused_on_the_cpu_when_the_driver_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(app, "nvidia_driver_answers", lambda: True)  # the probe's answer, injected
    monkeypatch.setattr(torch.version, "cuda", None)  # ... and torch as pip's default Windows wheel is: CPU-only
    image = tmp_path / "in.png"
    Image.new("RGBA", (64, 64), (10, 20, 30, 255)).save(image)

    code = app.main(["decompose", str(image), "--models-dir", str(tmp_path / "models"), "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2
    assert "An NVIDIA GPU is present (nvidia-smi answers)" in err and "--index-url https://download.pytorch.org/whl/cu130" in err
    assert not (tmp_path / "models").exists() and not (tmp_path / "out").exists()  # refused before any download or run


def test_the_demo_still_runs_on_the_cpu_with_the_fix_in_a_warning(caplog, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch build
    with caplog.at_level(logging.WARNING, logger=app.logger.name):
        app.check_torch_sees_gpu(demo=True, driver_answers=True)
    assert "pip install torch==" in caplog.text
    app.check_torch_sees_gpu(demo=False, driver_answers=False)  # no NVIDIA GPU: nothing to say
    with pytest.raises(TorchWithoutCudaError, match="built without CUDA"):
        app.check_torch_sees_gpu(demo=False, driver_answers=True)


# ---- the noise generator ------------------------------------------------------------------------------
def test_a_cpu_only_machine_draws_the_noise_on_the_cpu_and_params_json_says_so(demo_pipe, tmp_path):
    result = app.infer(demo_pipe, Image.new("RGBA", (64, 64), (200, 40, 40, 255)), prompt="a card", layers=2,
                       num_inference_steps=2, true_cfg_scale=1.0, seed=11)
    paths = save_run(result, tmp_path)

    generator = app.noise_generator(demo_pipe.pipe, 11)
    assert generator.device.type == "cpu"
    assert torch.equal(torch.randn(8, generator=generator), torch.randn(8, generator=torch.Generator().manual_seed(11)))
    assert json.loads(paths["params"].read_text())["generator_device"] == "cpu"


def test_on_cuda_the_noise_comes_from_a_cuda_generator_whatever_the_offload_mode(monkeypatch):
    """No GPU here: the generator class is replaced by a recorder, and the pipeline by its execution device, which
    is the GPU in every CUDA offload mode (off, model, sequential, budget)."""
    made = []

    class Recorder:
        def __init__(self, device):
            self.device = torch.device(device)
            made.append(self.device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    monkeypatch.setattr(app.torch, "Generator", Recorder)
    for device in (torch.device("cuda", 0), torch.device("cuda", 1)):
        pipe = type("Pipe", (), {"_execution_device": device})()
        assert app.noise_generator(pipe, 5).seed == 5
    assert made == [torch.device("cuda", 0), torch.device("cuda", 1)]
