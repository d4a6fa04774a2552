"""AWS adapters: IMDSv2 identity, boto3 clients, error mapping and the EBS volume decisions.

Nothing here imports boto3, botocore or requests at module level: commands that never talk to
AWS (verify-mount, --help) must not pay for those imports.
"""
