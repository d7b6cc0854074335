#!/usr/bin/env python3
"""Writes inert stand-ins for the CUDA libraries the PyPI torch wheel links against, so a
`pip install --no-deps torch` imports and runs on a CPU-only machine without ~2.5 GB of
nvidia-* wheels. Every stub function returns 100 (cudaErrorNoDevice / CUDA_ERROR_NO_DEVICE
and a non-success status for cuBLAS/cuDNN/...), so torch.cuda.is_available() is False.

usage: torch_cuda_stubs.py <torch/lib dir> <output dir>   (needs readelf and cc)
"""
import collections
import pathlib
import re
import subprocess
import sys

lib_dir, out_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out_dir.mkdir(parents=True, exist_ok=True)
present = {p.name for p in lib_dir.iterdir()}

def readelf(*args):
    return subprocess.run(["readelf", *args], check=True, capture_output=True, text=True).stdout

def version_owners(so):
    """Maps each needed symbol version of `so` to the library that must define it."""
    owners, current = {}, None
    for line in readelf("-V", "-W", str(so)).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Name: (\S+)", line)
        if m and current:
            owners[m.group(1)] = current
    return owners

needed = set()
symbols = collections.defaultdict(dict)  # soname -> {symbol: (kind, version or None)}
unversioned = {}
for so in sorted(lib_dir.glob("*.so*")):
    for m in re.finditer(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf("-d", str(so))):
        needed.add(m.group(1))
    owners = version_owners(so)
    for line in readelf("--dyn-syms", "-W", str(so)).splitlines():
        f = line.split()
        if len(f) < 8 or f[6] != "UND" or not f[7]:
            continue
        kind, name = f[3], f[7]
        if "@" in name:
            sym, ver = name.split("@", 1)
            ver = ver.split(" ")[0].lstrip("@")
            if ver in owners:
                symbols[owners[ver]][sym] = (kind, ver)
        else:
            unversioned[name] = kind

system = ("libc.so", "libm.so", "libdl.so", "librt.so", "libpthread.so", "ld-linux",
          "libstdc++", "libgcc_s", "libgomp", "libz.so", "libquadmath", "libgfortran")
missing = sorted(n for n in needed if n not in present and not n.startswith(system))
prefixes = {"libcuda.so": ("cu",), "libcufile.so": ("cuFile",), "libcusparseLt.so": ("cusparseLt",),
            "libnccl.so": ("nccl",), "libnvshmem": ("nvshmem",)}
for soname in missing:
    syms = dict(symbols.get(soname, {}))
    for base, pre in prefixes.items():
        if soname.startswith(base):
            for name, kind in unversioned.items():
                if name.startswith(pre) and (base != "libcuda.so" or not name.startswith(("cuFile", "cusparse", "cublas", "cudnn", "cufft", "curand", "cusolver", "cuda"))):
                    syms.setdefault(name, (kind, None))
    versions = sorted({v for _, v in syms.values() if v})
    c = ['static const char stub_msg[] = "CUDA is not installed (CPU-only torch)";']
    for name, (kind, _) in sorted(syms.items()):
        if kind == "OBJECT":
            c.append(f"char {name}[512];")
        elif name.endswith(("GetErrorString", "GetErrorName", "GetStatusString", "GetStatusName")):
            c.append(f"const char *{name}(void) {{ return stub_msg; }}")
        else:
            c.append(f"int {name}(void) {{ return 100; }}")
    src = out_dir / f"{soname}.c"
    src.write_text("\n".join(c) + "\n")
    cmd = ["cc", "-shared", "-fPIC", "-w", "-o", str(out_dir / soname), f"-Wl,-soname,{soname}", str(src)]
    if versions:
        vs = out_dir / f"{soname}.map"
        vs.write_text("".join(f"{v} {{ global: *; }};\n" for v in versions))
        cmd.append(f"-Wl,--version-script={vs}")
    subprocess.run(cmd, check=True)
    src.unlink()
    if versions:
        vs.unlink()
    print(f"stub {soname}: {len(syms)} symbols, versions {versions or '-'}")
