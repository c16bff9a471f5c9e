package registry

import (
	"github.com/sirupsen/logrus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// ZapLogger forwards etcd's zap log lines at or above level to the
// injected logrus logger: the library logs only through the logger given.
func ZapLogger(log logrus.FieldLogger, level string) *zap.Logger {
	lvl, err := zapcore.ParseLevel(level)
	if err != nil {
		lvl = zapcore.WarnLevel
	}
	return zap.New(&logrusCore{log: log, min: lvl})
}

type logrusCore struct {
	log    logrus.FieldLogger
	min    zapcore.Level
	fields []zapcore.Field
}

func (c *logrusCore) Enabled(l zapcore.Level) bool { return l >= c.min }

func (c *logrusCore) With(fs []zapcore.Field) zapcore.Core {
	return &logrusCore{log: c.log, min: c.min, fields: append(append([]zapcore.Field(nil), c.fields...), fs...)}
}

func (c *logrusCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *logrusCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	l := c.log.WithFields(logrus.Fields(enc.Fields))
	if e.LoggerName != "" {
		l = l.WithField("logger", e.LoggerName)
	}
	switch {
	case e.Level >= zapcore.ErrorLevel:
		l.Error(e.Message)
	case e.Level == zapcore.WarnLevel:
		l.Warn(e.Message)
	case e.Level == zapcore.InfoLevel:
		l.Info(e.Message)
	default:
		l.Debug(e.Message)
	}
	return nil
}

func (c *logrusCore) Sync() error { return nil }
