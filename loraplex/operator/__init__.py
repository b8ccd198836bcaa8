"""The loraplex operator: BaseModelDeployment and LoraAdapter reconciled into engine pods.

Only `loraplex.manifest` is imported from the rest of loraplex: the operator image carries no torch.
Run it with the `loraplex-operator` console script (kopf underneath).
"""
