from setuptools import Extension, find_packages, setup

setup(
    name="meshgate",
    version="0.1.0",
    description="Distributed WebSocket long-connection gateway: one process per core, many machines, one mesh.",
    python_requires=">=3.9",
    packages=find_packages(include=["cluster", "cluster.*", "node", "node.*", "coordinator", "coordinator.*"]),
    package_data={"node": ["static/*.html"]},
    # C versions of a few per-request functions (cluster/speedups.py). Optional: without a compiler the
    # install goes on and the Python versions run.
    ext_modules=[Extension("cluster._speedups", ["cluster/_speedups.c"], optional=True)],
    install_requires=[
        "tornado>=6.2,<7",
        "pyzmq>=25,<28",
        "ujson>=5.4,<7",
        # Strict JSON read first, in about half ujson's time (cluster/protocol.py, json_loads).
        "msgspec>=0.18,<1",
        "click>=8.0,<9",
        "psutil>=5.9,<8",
        # /metrics (docs/operations.md, Metrics): the exposition format from Prometheus' own library.
        "prometheus-client>=0.17,<1",
        "PyYAML>=6.0,<7",   # the configuration file is YAML (docs/configuration.md)
        # Client servers with auth.jwt check JSON Web Tokens (docs/protocol.md, Client WebSocket server) ...
        "PyJWT>=2.8,<3",
        # ... and RS*, PS*, ES* and EdDSA signatures need the cryptography backend.
        "cryptography>=41",
        # The event loop of the node processes where it builds (cluster/event_loop.py falls back to asyncio's).
        "uvloop>=0.17; sys_platform != 'win32' and platform_python_implementation == 'CPython'",
    ],
    extras_require={
        "test": [
            "pytest>=7,<10",
            "pytest-timeout>=2.1,<3",
            "websocket-client>=1.5,<2",
            # tests/test_browser.py drives Debian's Chromium with it (never a downloaded browser).
            "playwright>=1.40,<2",
            # tests make TLS certificates (and JWT signing keys) at run time.
            "cryptography>=41",
            # property-based tests of the protocol parsers and the mesh readers.
            "hypothesis>=6.80,<7",
        ],
        # bench/: the hand-written `websockets` broadcast server is the baseline (bench/baseline_server.py
        # uses websockets.asyncio, new in 13); websocket-client runs the Nchan smoke test.
        "bench": ["websockets>=13,<16", "websocket-client>=1.5,<2"],
    },
    entry_points={"console_scripts": ["meshgate = cluster.cli:main"]},
)
