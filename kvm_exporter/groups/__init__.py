"""process-exporter's named groups: processes named by its ``process_names`` rules, counted per
name, served under kvm_namegroup_* (and its own names with ``compat: [process_exporter]``).

- ``rules.py``: the rules as the config gives them (checked when the config is loaded), how a
  rule matches a process and the name its template gives it; reads nothing of the system.
- ``tracker.py``: the :class:`~kvm_exporter.groups.tracker.Grouper`, which names each process
  once from the rules and counts the named processes per group each poll, from the same usage
  records the resources are tracked from (a :class:`~kvm_exporter.usage.Tracker` whose accounts
  are the named groups).
- ``families.py``: the metric families served from the poller's last
  :class:`~kvm_exporter.groups.tracker.GroupCounts`.

The flow: config -> ``rules`` -> poller -> ``tracker`` (one poll's counts) -> ``families``
(a scrape). Nothing is re-exported here: import from the module that holds it.
"""
