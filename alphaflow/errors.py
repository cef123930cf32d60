"""Errors a user can fix (bad params, corrupt or missing input, a wrong checkpoint or weights file).

`alphaflow <stage>` prints such an error as one message naming the file/key and what to do, and exits 2;
the traceback only with ALPHAFLOW_DEBUG=1. Anything else is an internal error and keeps its traceback.
A stage that saved its state and wants to be started again exits with REQUEUE_EXIT_CODE.
A full disk or a spent quota is an OutOfSpace, raised by the writer after it removed its partial files.
"""

import os

REQUEUE_EXIT_CODE = os.EX_TEMPFAIL  # 75: "temporary failure, retry"; the launcher requeues the job


class UserError(Exception):
    """Bad input the user can fix; the message names the file or key and what to do."""


class MissingInputError(UserError, FileNotFoundError):
    """A required input file (dataset, weights) is absent; the message says where to get it.

    Also a FileNotFoundError, so code that catches that (e.g. to skip a test) keeps working.
    """


class InvalidInputError(UserError, ValueError):
    """An input file or folder has the wrong content (corrupt, wrong layout, wrong checkpoint).

    Also a ValueError, so code that catches that keeps working.
    """


class OutOfSpace(UserError):
    """A write that found its filesystem full (ENOSPC) or the quota spent (EDQUOT), or a checkpoint that would not
    fit; the message names the path, what was written, the space needed and free. The writer removed its partial
    files first, so what was saved before is intact and re-running the same command resumes.

    Not an OSError: code that catches OSError to try another way (a copy where a link fails) must not swallow it.
    """
