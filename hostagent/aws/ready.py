"""Make an EC2 client ready for one call that nothing else may delay: CreateSnapshot inside a freeze.

What a first call would otherwise do inside the window, done before it instead:
  * credentials: on an instance they are the role's, fetched from IMDS, and botocore refetches
    them while signing whenever they expire within 15 minutes. They are resolved (and refreshed
    if due) here, and the client signs with that fixed copy until the call is done, so no
    signing can fetch anything. botocore hands out credentials with at least 10 minutes left
    (it refreshes them first otherwise), far longer than a freeze lasts: the watchdog ends it
    after snapshot.freeze_timeout (60 s by default).
  * the operation's model (input/output shapes), which botocore builds on first use;
  * the connection: the client's pooled keep-alive connection from the volume lookup a moment
    ago is reused. No extra call is made for it, unless the connection has been idle long enough
    (a long sync) that the endpoint may have closed it: then one DescribeVolumes of the volume
    re-opens it, so no TCP and TLS handshake happens inside the window.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from hostagent.aws.errors import aws_call

# An idle keep-alive connection younger than this is taken as still open; older, one cheap call
# re-opens it before the freeze (AWS endpoints close idle connections after some tens of seconds).
IDLE_SAFE_SECONDS = 10.0


@contextlib.contextmanager
def ready_for_call(ec2, operation: str, *, volume_id: str, idle_for: float = 0.0) -> Iterator[None]:
    """Within the block, `operation` on `ec2` signs with credentials fixed beforehand."""
    from botocore.credentials import Credentials

    ec2.meta.service_model.operation_model(operation)  # built once, cached by botocore
    if idle_for >= IDLE_SAFE_SECONDS:
        with aws_call("ec2:DescribeVolumes", where=volume_id):
            ec2.describe_volumes(VolumeIds=[volume_id])
    # botocore has no public handle on the credentials a client signs with; its RequestSigner
    # keeps them here. Without it (a botocore that moved them), the client is left as it is.
    signer = getattr(ec2, "_request_signer", None)
    credentials = getattr(signer, "_credentials", None)
    if credentials is None:
        yield
        return
    with aws_call(f"ec2:{operation}", where=volume_id):
        current = credentials.get_frozen_credentials()  # may fetch from IMDS: here, not inside
    signer._credentials = Credentials(current.access_key, current.secret_key, current.token,
                                      account_id=getattr(current, "account_id", None))
    try:
        yield
    finally:
        signer._credentials = credentials
