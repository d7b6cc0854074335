{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "petl-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "petl-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "petl-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "petl-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "petl-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "petl-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "petl-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "petl-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* <image.registry>/<name>:<tag, default appVersion> */}}
{{- define "petl-operator.petlImage" -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .name (default .root.Chart.AppVersion .root.Values.image.tag) }}
{{- end }}

{{- define "petl-operator.image" -}}
{{- default (include "petl-operator.petlImage" (dict "root" . "name" "petl-operator")) .Values.operatorImage }}
{{- end }}

{{- define "petl-operator.trainerImage" -}}
{{- default (include "petl-operator.petlImage" (dict "root" . "name" "petl-worker")) .Values.trainerImage }}
{{- end }}

{{- define "petl-operator.trainerCudaImage" -}}
{{- default (include "petl-operator.petlImage" (dict "root" . "name" "petl-worker-cuda")) .Values.trainerCudaImage }}
{{- end }}

{{/* The operator's ServiceAccount as the API server names the user. */}}
{{- define "petl-operator.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "petl-operator.serviceAccountName" .) }}
{{- end }}
