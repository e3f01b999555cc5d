"""kvm_exporter: process, load and swap metrics from FreeBSD's kvm(3) or Linux's /proc."""

__version__ = "0.1.0"
