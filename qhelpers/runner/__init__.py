"""The notebook runner behind ``run_all.py``: executes every ``notebooks/*.ipynb`` headless with
papermill, each in its own worker subprocess and kernel, and summarises their verdicts.

It imports no numeric library (an import-linter contract): the process that supervises the
kernels stays light. One run writes one folder::

    runs/<UTC timestamp>/            (or --out DIR / --resume DIR)
        summary.md  index.html       rewritten atomically after every notebook
        run_config.json              the manifest: the command (re-applied by --resume), qhelpers
                                     version, git commit and code hash, each notebook's input hashes
        runner.log                   the progress lines
        <stem>/<stem>.ipynb          the executed notebook (partial if it failed)
        <stem>/results.json, figures written by the notebook into OUTPUT_DIR
        <stem>/log.txt               papermill's log and every cell's output
        <stem>/run.json              status, parameters as run, hashes (parameters, code, qhelpers,
                                     results.json), model fingerprint, times, error
        <stem>.prev-<n>/             an earlier folder of a notebook that ran again (never deleted)

Nothing completed is ever deleted or altered, "completed" means a results.json that still has its
recorded hash, and every failure (a notebook, a worker, a kernel, a file that cannot be written)
stays with its notebook; tests/test_faults.py breaks each on purpose.

Modules, each importing only those above it in this list:

- ``errors``: ``RunnerError`` (exit code 2) and the exit codes;
- ``records``: run.json / results.json of a notebook folder, JSON written atomically, what makes a
  result completed, folders moved aside;
- ``notebooks``: finding, selecting and reading the notebooks (purpose line, expected run time, code hash);
- ``params``: a notebook's parameters cell (parsed with ``ast``, never run), ``-p`` values
  (YAML, never eval), the parameters hash;
- ``profiles``: ``notebooks/profiles.yaml`` (``_all`` and per-notebook values);
- ``plan``: what each notebook gets injected (profile, then ``--model``/``--device``/``-p``), and grids
  (``--models``, ``--grid``: one job per combination, each in its own folder), and the order several
  workers start them in (longest expected first);
- ``checks``: the injected values checked before any work (kinds, language groups);
- ``manifest``: run_config.json, the command it records and how ``--resume`` re-applies it;
- ``fingerprints``: the qhelpers code hash, version and git commit, a model's files fingerprint;
- ``environment``: the Jupyter kernel check, GPUs per worker, BLAS threads, the kernel's variables;
- ``locks``: the run folder's and each notebook's lock;
- ``processes``: worker sessions, death of the runner, killing a kernel left behind;
- ``summary``: summary.md and index.html (with the cross-model table of a grid);
- ``goldens``: ``--write-goldens`` (relative OUTPUT_DIR, copies for nbval);
- ``backends``: the scheduler interface (a job started, polled, stopped) and the ``local`` backend;
- ``ray_backend``: ``--backend ray``, each job a Ray task whose files come back as bytes;
- ``worker``: one notebook executed with papermill (``python -m qhelpers.runner.worker JOB``);
- ``supervise``: ``Runner``, the workers scheduled, stopped on a signal, resumed;
- ``cli``: the command line, ``main`` (``python run_all.py --help``).
"""
