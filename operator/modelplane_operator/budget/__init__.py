"""Budgets: spend per period, thresholds and the spend leases that bound overspend.

`period` is the calendar math (daily / weekly / monthly in an IANA time zone), `ledger` the pure
per-Budget accounting (spent, lease grants, settlement, rollover, thresholds, status), and
`service` ties ledgers to the config stream and to Budget status. docs/budgets.md states the bound.
"""
