#!/usr/bin/env bash
# The SSM-lineage family space searched as a user would, then its table (2-core CPU, about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/../.."
hybridnas search search_spaces/ssm_family.yaml 2>&1 | tr '\r' '\n' | grep -v '^trials:' | tee experiments/ssm_family/search_output.txt
hybridnas show ssm_family | tee experiments/ssm_family/show_output.txt
