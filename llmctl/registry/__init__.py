"""Model versions: MLflow's model registry holding each registered checkpoint's lineage, and the
`NAME@VERSION` / `NAME@ALIAS` references every command accepts in place of a checkpoint path."""
