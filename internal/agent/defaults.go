package agent

import "github.com/vtpmm/vtpmm/migrate"

const migrateDefaultMaxAge = migrate.DefaultEvidenceMaxAge
