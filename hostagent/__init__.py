"""hostagent: make an EC2 host ready to run CouchDB under ECS on a persistent EBS volume."""

__version__ = "0.1.0"
