{{- define "loraplex.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraplex.labels" -}}
app.kubernetes.io/name: loraplex-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "loraplex.selectorLabels" -}}
app.kubernetes.io/name: loraplex-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "loraplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "loraplex.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches, as a JSON list; empty = all of them (rbac.clusterWide
only). Namespaced by default: watchNamespaces, else the release namespace. */}}
{{- define "loraplex.watchNamespaces" -}}
{{- if .Values.rbac.clusterWide -}}
{{- if .Values.watchNamespaces -}}
{{- fail "rbac.clusterWide watches every namespace: leave watchNamespaces empty (or set rbac.clusterWide: false)" -}}
{{- end -}}
{{- toJson list -}}
{{- else -}}
{{- toJson (.Values.watchNamespaces | default (list .Release.Namespace)) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces engine pods run in: engineNamespaces, else the watched ones (a JSON list). */}}
{{- define "loraplex.engineNamespaces" -}}
{{- $ns := .Values.engineNamespaces | default (include "loraplex.watchNamespaces" . | fromJsonArray) | default list -}}
{{- toJson $ns -}}
{{- end -}}

{{/* A selector of namespaces for prometheus-operator monitors. */}}
{{- define "loraplex.engineNamespaceSelector" -}}
{{- $ns := include "loraplex.engineNamespaces" . | fromJsonArray -}}
{{- if $ns -}}
matchNames:
  {{- toYaml $ns | nindent 2 }}
{{- else -}}
any: true
{{- end }}
{{- end -}}

{{- define "loraplex.engineSelectorLabels" -}}
app.kubernetes.io/name: loraplex-engine
{{- end -}}
