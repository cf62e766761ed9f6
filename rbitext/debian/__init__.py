"""The ``deb`` runner: builds a Debian source package as PyBit's Debian build client does.

Configure it on a ``deb`` queue::

    [runner:Debian_amd64_unstable_deb]
    runner = python!rbitext.debian:build
    build-root = /var/cache/rbit/debian
    dput-dest = my-repository

For each request it

1. fetches the source named by the request's transport into a fresh work
   directory under ``build-root``: ``git`` (clone, then check out ``vcs_id``
   when set) or ``svn`` (export at ``vcs_id``, else HEAD);
2. checks the build dependencies with ``dpkg-checkbuilddeps``: unmet ones
   raise :class:`rbit.Blocked`, so the job is offered again later;
3. builds with ``dpkg-buildpackage -us -uc -d`` (unsigned; dependencies are
   checked in step 2), or with the ``builder`` command. As in PyBit, the
   master request of a package builds the source and every binary package;
   the requests for the other architectures build with ``-B``
   (architecture-dependent binaries only), and do nothing when every binary
   package is ``Architecture: all``;
4. copies the results (every file the build left in the work directory) to
   ``output-dir/JOB``; when ``dput-dest`` is set and ``dry-run`` is not,
   uploads each ``.changes`` with ``dput`` and reports ``Uploaded``;
5. removes the work directory, which ``keep-failed = true`` keeps after a
   failure.

Every command and its output go to the runner's standard output, which the
worker keeps as the job's log (one file per attempt: ``rbit logs CONFIG JOB``).
A failure raises :class:`rbit.Failed` with the last lines of that output.

Settings (all strings; flags are ``true`` or ``false``), checked when the
configuration is read (``build.check_settings``), so that a mistake stops
``rbit CONFIG``, ``--check`` and ``rbit try`` before any connection, naming the key:

================  ==========================  =========================================
key               default                     meaning
================  ==========================  =========================================
build-root        ``$TMPDIR/rbit-debian``     absolute path; ``work/`` and (by
                                              default) ``output/`` go there
output-dir        ``BUILD-ROOT/output``       absolute path; results go to ``JOB/`` in it
builder           dpkg-buildpackage (above)   the build command, split like a shell
                                              line; placeholders below
check-build-deps  ``true``                    run ``dpkg-checkbuilddeps`` first (turn it
                                              off for chroot builders such as sbuild)
dput-dest         (none: no upload)           the dput host (a section of dput.cf)
dput-options      (none)                      more dput arguments, e.g. ``-U``
dry-run           ``false``                   build, but do not upload
keep-failed       ``false``                   keep the work directory after a failure
================  ==========================  =========================================

The ``builder`` command runs in the unpacked source tree and must leave its
results in the work directory (dpkg-buildpackage writes to ``..``, which is
it). Each placeholder is replaced inside its own argument, so a value never
adds an argument: ``%DIR`` the source tree, ``%WORK`` the work directory,
``%DSC`` the ``.dsc`` (built first with ``dpkg-source --build`` when the
command names it), the request's ``%ID``, ``%PACKAGE``, ``%VERSION``,
``%DIST``, ``%ARCH``, ``%SUITE``, ``%FORMAT``, ... (as for ``shell!``), and
``%%``. Put request values after an ``=`` (``--dist=%SUITE``) so that none can
be read as an option. For example::

    builder = sbuild --dist=%SUITE --arch-all --source --build-dir=%WORK %DSC
    check-build-deps = false

Nothing from a message reaches a shell: commands are argument lists, and
``--`` separates options from a URI.
"""

import logging
import time

from rbit import statuses
from rbit.errors import Blocked
from rbit.runners.shell import job_environment

from .settings import ARCH_BUILDER, DEFAULT_BUILD_ROOT, MASTER_BUILDER, Options, parse_settings
from .steps import (
    QUIET_ENV, SOURCE_DIR, TAIL_LINES, BuildLog, check_build_deps, clean, collect, fetch,
    has_arch_binaries, make_work_dir, prepare_build_root, run_builder, upload,
)

__all__ = [
    "ARCH_BUILDER", "DEFAULT_BUILD_ROOT", "MASTER_BUILDER", "Options", "parse_settings", "SOURCE_DIR",
    "TAIL_LINES", "BuildLog", "fetch", "build", "choose_builder", "upload_wanted",
]

log = logging.getLogger(__name__)


def build(message, set_status, settings):
    """Fetch, check, build and upload the package *message* asks for."""
    options = parse_settings(settings)  # checked at start (build.check_settings): only typed here
    job_id = message.job_id
    prepare_build_root(options.build_root)
    with BuildLog() as build_log:
        build_log.note(f"{time.strftime('%Y-%m-%d %H:%M:%S')} job {job_id}: "
                       f"{message.request.get_package()} {message.request.get_version()} "
                       f"from {message.queue}")
        work = make_work_dir(options.build_root, job_id)
        try:
            _build_in(work, message, set_status, options, build_log)
        except Blocked:
            clean(work)
            raise
        except BaseException:
            if options.keep_failed:
                log.info("clean: keeping the work directory %s", work)
            else:
                clean(work)
            raise
        clean(work)


def _build_in(work, message, set_status, options, build_log):
    """The phases of one job, in *work*."""
    request = message.request
    fields = {**request.fields(), "QUEUE": message.queue}
    env = {**job_environment(fields, {}), **QUIET_ENV}
    source = fetch(request.transport, work / SOURCE_DIR, build_log, env)
    builder = choose_builder(options, request.job.packageinstance.master, source)
    if builder is None:
        return
    if options.check_build_deps:
        check_build_deps(source, build_log, env, arch_only=builder == ARCH_BUILDER)
    run_builder(builder, source, fields, build_log, env)
    results = collect(work, options.output_dir / str(request.get_job_id()))
    if upload_wanted(options):
        upload(results, options, build_log, env)
        set_status(statuses.UPLOADED)


def choose_builder(options, master, source):
    """The build command template for the request; None when it has nothing to build."""
    if options.builder:
        return options.builder
    if master:
        return MASTER_BUILDER
    if has_arch_binaries(source):
        return ARCH_BUILDER
    log.info("build: nothing to build: every binary package is Architecture: all, "
             "which the master request builds")
    return None


def upload_wanted(options):
    """True when the results go to ``dput-dest``."""
    if options.dput_dest is None:
        return False
    if options.dry_run:
        log.info("upload: dry run, not uploading to %s", options.dput_dest)
        return False
    return True


#: rbit checks the settings with this when it reads the configuration.
build.check_settings = parse_settings
