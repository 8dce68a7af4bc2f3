{{/* Names, labels and computed values shared by the templates. */}}

{{- define "modelplane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelplane.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; "modelplane.labels" adds the operator component. */}}
{{- define "modelplane.baseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "modelplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelplane
{{- end -}}

{{- define "modelplane.labels" -}}
{{ include "modelplane.baseLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "modelplane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelplane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "modelplane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "modelplane.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "modelplane.webhookServiceName" -}}
{{- printf "%s-webhook" (include "modelplane.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelplane.streamServiceName" -}}
{{- include "modelplane.fullname" . -}}
{{- end -}}

{{- define "modelplane.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "modelplane.fullname" .)) .Values.certificates.secretName -}}
{{- end -}}

{{/* Cluster-scoped, so it carries the namespace: two releases never share one. */}}
{{- define "modelplane.webhookConfigurationName" -}}
{{- printf "%s-%s-injector" (include "modelplane.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Role(Binding) in each watched namespace: get the referenced Secrets. Carries the release
namespace, as two releases may watch the same namespace. */}}
{{- define "modelplane.secretReaderName" -}}
{{- printf "%s-%s-secrets" (include "modelplane.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "modelplane.clusterRoleName" -}}
{{- printf "%s-%s" (include "modelplane.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "modelplane.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "modelplane.controlPlaneURL" -}}
{{- if .Values.sidecar.controlPlaneURL -}}
{{- .Values.sidecar.controlPlaneURL -}}
{{- else -}}
{{- printf "https://%s.%s.svc:%v" (include "modelplane.streamServiceName" .) .Release.Namespace .Values.service.streamPort -}}
{{- end -}}
{{- end -}}

{{/* Both webhooks share this: exclusions, the release namespace, and the user's expressions. */}}
{{- define "modelplane.namespaceExpressions" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values:
    {{- range (append .Values.webhook.excludedNamespaces .Release.Namespace | uniq) }}
    - {{ . | quote }}
    {{- end }}
{{- with .Values.webhook.namespaceSelectorExpressions }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "modelplane.validate" -}}
{{- if not (has .Values.webhook.mode (list "service" "url")) -}}
{{- fail (printf "webhook.mode must be \"service\" or \"url\", not %q" .Values.webhook.mode) -}}
{{- end -}}
{{- if and (eq .Values.webhook.mode "url") (not (hasPrefix "https://" .Values.webhook.url)) -}}
{{- fail "webhook.mode=url needs webhook.url, an https:// base URL such as https://127.0.0.1:9443" -}}
{{- end -}}
{{- if not (has .Values.webhook.failurePolicy (list "Ignore" "Fail")) -}}
{{- fail (printf "webhook.failurePolicy must be Ignore or Fail, not %q" .Values.webhook.failurePolicy) -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail "operator.replicas > 1 needs operator.leaderElection.enabled=true: without a leader every replica would write status and grant budget leases" -}}
{{- end -}}
{{- if and .Values.sidecar.auditSigningKey.existingSecret (not .Values.sidecar.auditLog) -}}
{{- fail "sidecar.auditSigningKey.existingSecret needs sidecar.auditLog=true: the key signs the audit trail" -}}
{{- end -}}
{{- if eq (int .Values.sidecar.port) (int .Values.sidecar.healthPort) -}}
{{- fail "sidecar.port and sidecar.healthPort must differ" -}}
{{- end -}}
{{- end -}}

{{/* `modelplane operator` flags; the e2e suite runs exactly these against its local cluster. */}}
{{- define "modelplane.operatorArgs" -}}
- --host=0.0.0.0
- --port={{ .Values.operator.streamPort }}
- --audience={{ .Values.operator.tokenAudience }}
- --log-level={{ .Values.operator.logLevel }}
{{- with .Values.operator.leaderElection }}
{{- if .enabled }}
- --leader-election
- --lease-name={{ include "modelplane.fullname" $ }}
- --lease-namespace={{ $.Release.Namespace }}
- --lease-duration={{ .leaseDurationSeconds }}
- --lease-renew-deadline={{ .renewDeadlineSeconds }}
- --lease-retry-period={{ .retryPeriodSeconds }}
{{- end }}
{{- end }}
{{- range .Values.operator.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
- --secret-resync-seconds={{ .Values.operator.secretResyncSeconds }}
- --tls-namespace={{ .Release.Namespace }}
- --tls-secret={{ include "modelplane.tlsSecretName" . }}
- --tls-service={{ include "modelplane.streamServiceName" . }}
- --tls-service={{ include "modelplane.webhookServiceName" . }}
{{- if eq .Values.webhook.mode "url" }}
- --tls-host={{ (urlParse .Values.webhook.url).hostname }}
{{- end }}
{{- range .Values.certificates.extraHosts }}
- --tls-host={{ . }}
{{- end }}
- --tls-dir=/var/run/modelplane/tls
- --tls-check-interval={{ .Values.certificates.checkIntervalSeconds }}
- --tls-cert-days={{ .Values.certificates.servingCertDays }}
- --tls-ca-days={{ .Values.certificates.caDays }}
{{- if .Values.webhook.enabled }}
- --webhook-host={{ .Values.webhook.listenHost }}
- --webhook-port={{ .Values.webhook.port }}
- --webhook-configuration={{ include "modelplane.webhookConfigurationName" . }}
{{- range (append .Values.webhook.excludedNamespaces .Release.Namespace | uniq) }}
- --webhook-excluded-namespace={{ . }}
{{- end }}
- --sidecar-image={{ include "modelplane.image" (list .Values.sidecar.image .) }}
- --sidecar-image-pull-policy={{ .Values.sidecar.image.pullPolicy }}
- --control-plane-url={{ include "modelplane.controlPlaneURL" . }}
- --sidecar-port={{ .Values.sidecar.port }}
- --sidecar-health-port={{ .Values.sidecar.healthPort }}
- --sidecar-cpu-request={{ .Values.sidecar.resources.requests.cpu }}
- --sidecar-memory-request={{ .Values.sidecar.resources.requests.memory }}
- --sidecar-cpu-limit={{ .Values.sidecar.resources.limits.cpu }}
- --sidecar-memory-limit={{ .Values.sidecar.resources.limits.memory }}
- --sidecar-run-as-user={{ .Values.sidecar.runAsUser }}
- --sidecar-log-level={{ .Values.sidecar.logLevel }}
{{- if not .Values.sidecar.auditLog }}
- --no-sidecar-audit-log
{{- end }}
{{- with .Values.sidecar.auditSigningKey }}
{{- if .existingSecret }}
- --sidecar-audit-key-secret={{ .existingSecret }}
- --sidecar-audit-key-secret-key={{ .key }}
{{- end }}
{{- end }}
- --token-audience={{ .Values.operator.tokenAudience }}
- --token-expiration-seconds={{ .Values.sidecar.tokenExpirationSeconds }}
{{- end }}
{{- end -}}
